"""`mapc verify SUSPECT --ownership KEYFILE`: does a suspect model carry the owner's watermark?

The suspect is an ONNX file or any model format `mapc compile` loads (exported to ONNX first); it runs in
onnxruntime on the labelled authorized test rows (all rows without a split), clean, stamped with the key's
trigger and stamped with control patterns (``mapc.watermark``, which states the test). Preprocessing comes
from the flags, else the suspect's sealed metadata; a suspect whose input does not fit is bad input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import load_domain
from .errors import UserError
from .evaluate import check_input_fits, run_logits, session
from .preprocess import Preprocess, apply


@dataclass
class OwnershipRequest:
    suspect: str
    key_path: str
    authorized: dict[str, str]
    provider: str = "auto"
    preprocess: tuple = (None, None, None, None)    # --input-size, --channels, --mean, --std as given
    arch: str | None = None
    trust_pickle: bool = False
    reference: str | None = None        # the owner's artifact: weight provenance (``mapc.provenance``) as well


def suspect_preprocess(req: OwnershipRequest, sealed: dict | None, override) -> Preprocess:
    from .preprocess import preprocess_from
    given = any(v for v in req.preprocess)
    if sealed is None and not given:
        raise UserError(f"{req.suspect}: carries no mapc.preprocess metadata; pass the owner's preprocessing "
                        f"(--input-size H W --channels C --mean M --std S)")
    base = preprocess_from(sealed, f"{req.suspect}: sealed mapc.preprocess") if sealed else Preprocess()
    return override(base, *req.preprocess) if given else base


def ownership_report(req: OwnershipRequest, override) -> tuple[dict, str]:
    from .report import tool_versions
    from .verify import baseline_model, load_artifact, sealed_metadata, sha256_file
    from .watermark import ALPHA, MIN_EFFECT, measure_ownership, read_key

    key = read_key(req.key_path)
    if len(req.authorized) != 1:
        raise UserError("--ownership needs exactly one --authorized NAME=PATH (labelled rows of the owner's domain)")
    name, path = next(iter(req.authorized.items()))
    p = Path(req.suspect)
    if p.suffix == ".onnx":
        model = load_artifact(req.suspect, "suspect model")
        sealed = sealed_metadata(model).get("mapc.preprocess")
        pre = suspect_preprocess(req, sealed, override)
        sess, fmt = session(str(p), req.provider, source=str(p)), "onnx"
    else:
        pre = suspect_preprocess(req, None, override)
        model, fmt = baseline_model(req.suspect, pre, req.arch, req.trust_pickle)
        sess = session(model, req.provider)
    out_dim = sess.get_outputs()[0].shape[-1]
    d = load_domain(name, path, int(out_dim) if isinstance(out_dim, int) else None)
    if d.labels is None:
        raise UserError(f"{path}: domain {name!r} has no labels; the ownership test needs labelled authorized rows")
    rows = d.rows("test")
    if len(rows) == 0:
        raise UserError(f"{path}: domain {name!r} has no test rows in 'split'")
    x = apply(pre, d.images[rows])
    check_input_fits(sess, x, f"{path} (domain {name!r}, suspect {req.suspect})")
    o = measure_ownership(lambda rows_x: run_logits(sess, rows_x), x, d.labels[rows].astype(np.int64), key, pre)
    provenance = None
    if req.reference is not None:
        from .provenance import weight_provenance
        provenance = weight_provenance(model, load_artifact(req.reference, "reference artifact"))
    owned = bool(o["owned"] or (provenance is not None and provenance["derived"]))
    report = {"tool": tool_versions(), "command": "verify-ownership", "providers": sess.get_providers(),
              "suspect": {"path": str(p), "sha256": sha256_file(p), "format": fmt},
              "preprocess": pre.to_dict(),
              "authorized": {"name": name, "path": path, "rows": "test" if d.has_split else "all (no split)"},
              "ownership": o, "provenance": provenance, "owned": owned}
    word = "OWNED" if owned else "NOT OWNED"
    if provenance is None:
        line = (f"{word} | p={o['p_value']} (alpha {ALPHA:g}), effect {o['effect'] * 100:.0f} % (at least "
                f"{MIN_EFFECT * 100:.0f} %) | key trigger {o['key_acc']:.1f} % vs control "
                f"{o['control_acc']:.1f} % vs clean {o['clean_acc']:.1f} % on {o['n']} rows")
    else:   # either test may carry the verdict: the smaller p, doubled (Bonferroni over the two tests)
        from .watermark import p_text
        log10_p = min(0.0, math.log10(2) + min(o["log10_p"], provenance["log10_p"]))
        report["log10_p"] = log10_p
        line = (f"{word} | p={p_text(log10_p)} (two tests, each at alpha {ALPHA:g}) | watermark "
                f"{'OWNED' if o['owned'] else 'not owned'}: p={o['p_value']}, key trigger {o['key_acc']:.1f} % vs "
                f"control {o['control_acc']:.1f} % | weights {'DERIVED' if provenance['derived'] else 'not derived'}: "
                f"p={p_text(provenance['log10_p'])}, median r {provenance['effect']:.2f}")
    return report, line

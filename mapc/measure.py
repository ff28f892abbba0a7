"""One measurement path for `mapc compile`, `mapc verify` (and `mapc attack`): domains through onnxruntime.

Invariant: every per-domain figure a report carries comes from here, from
onnxruntime sessions over the artifact (and over the original, when there is
one) on the domain's measured rows (test rows when the data has a split, all
rows otherwise), with one schema for every command:

    {role, path, n, rows: "test" | "all (no split)", labels: "given" | "original model's predictions",
     protected_acc, protected_ci95, original_acc, original_ci95, drop, st_d}

``original_*`` and ``drop`` appear when an original was measured; ``st_d`` on
unauthorized domains when the authorized drop is known (ST-D = ΔS / ΔT,
only where ΔT > 0). Unlabelled rows are scored against the original model's
predictions when there is an original, and are bad input otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from .datasets import Domain
from .errors import UserError
from .evaluate import accuracy, check_input_fits, run_logits, st_d, wilson_interval
from .preprocess import Preprocess, apply

EXAMPLES_PER_DOMAIN = 6


@dataclass
class MeasuredRows:
    """A domain's measured rows, preprocessed once."""
    name: str
    role: str                      # "authorized" | "unauthorized"
    path: str
    images: np.ndarray             # uint8 rows (for the report's example images)
    x: np.ndarray                  # float32 NCHW model input
    labels: np.ndarray | None      # None: unlabelled
    has_split: bool

    @classmethod
    def test_rows(cls, d: Domain, role: str, pre: Preprocess) -> "MeasuredRows":
        rows = d.rows("test")
        if len(rows) == 0:
            raise UserError(f"{d.path}: domain {d.name!r} has no test rows in 'split'")
        return cls(d.name, role, d.path, d.images[rows], apply(pre, d.images[rows]),
                   None if d.labels is None else d.labels[rows], d.has_split)


@dataclass
class Measurement:
    domains: dict[str, dict]                                  # name -> report entry (schema above)
    logits: dict[str, np.ndarray] = field(default_factory=dict)   # name -> protected logits
    examples: dict[str, dict] = field(default_factory=dict)        # name -> images, labels, predictions

    @property
    def source_drop(self) -> float | None:
        auth = [e for e in self.domains.values() if e["role"] == "authorized"]
        return auth[0].get("drop") if auth else None

    @property
    def max_unauthorized_acc(self) -> float | None:
        return max((e["protected_acc"] for e in self.domains.values() if e["role"] == "unauthorized"), default=None)


def _logits(sess: ort.InferenceSession, m: MeasuredRows, what: str) -> np.ndarray:
    check_input_fits(sess, m.x, f"{m.path} (domain {m.name!r}{', ' + what if what else ''})")
    out = run_logits(sess, m.x)
    if not np.isfinite(out).all():
        raise UserError(f"the {what or 'artifact'} outputs NaN or infinite logits on {m.path}; it is unusable on "
                        f"these rows (check the model and its preprocessing)")
    return out


def measure_domains(protected: ort.InferenceSession, rows: list[MeasuredRows],
                    original: ort.InferenceSession | None = None) -> Measurement:
    """Top-1 of ``protected`` (and ``original``) on every domain's rows; see the module docstring."""
    out = Measurement({})
    for m in rows:
        lp = _logits(protected, m, "")
        lo = _logits(original, m, "original") if original is not None else None
        if m.labels is not None:
            labels, label_source = m.labels, "given"
        elif lo is not None:
            labels, label_source = lo.argmax(1), "original model's predictions"
        else:
            raise UserError(f"{m.path}: domain {m.name!r} has no labels; measuring accuracy needs them "
                            f"(or an original model whose predictions stand in)")
        ap = accuracy(lp, labels)
        entry = {"role": m.role, "path": m.path, "n": int(len(labels)),
                 "rows": "test" if m.has_split else "all (no split)", "labels": label_source,
                 "protected_acc": ap, "protected_ci95": wilson_interval(ap, len(labels))}
        if lo is not None:
            ao = accuracy(lo, labels)
            entry.update(original_acc=ao, original_ci95=wilson_interval(ao, len(labels)), drop=ao - ap)
        out.domains[m.name] = entry
        out.logits[m.name] = lp
        k = min(EXAMPLES_PER_DOMAIN, len(labels))
        out.examples[m.name] = {"images": m.images[:k], "labels": labels[:k].tolist(),
                                "predictions": lp[:k].argmax(1).tolist()}
    source_drop = out.source_drop
    for e in out.domains.values():
        if e["role"] == "unauthorized" and source_drop is not None and "drop" in e:
            e["st_d"] = st_d(source_drop, e["drop"])
    return out

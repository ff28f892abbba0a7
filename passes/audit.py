"""audit: prove the artifact carries the protection and nothing it must not.

Fails the pipeline (PassError) when:
- the mask prunes nothing (the artifact would be the unprotected model);
- a masked position of a masked weight holds a non-zero (the weight is found
  by its parameter name, else by its mask pattern: an initializer of the
  same shape, or transposed shape, whose masked positions are all zero);
- any initializer equals an original weight that has masked positions
  (the unprotected weight is shipped), directly, transposed, or rescaled per
  output channel (BatchNorm folded in);
- a tensor or node that looks like a mask or a pre-mask copy remains
  (``*mask*``, ``*_orig``), or a Mul reads such a tensor;
- a doc string or metadata value holds an absolute file path or a traceback;
- any of the artifact-only checks fails (``artifact_checks``: what ``mapc verify``
  re-runs on a shipped file without the masks: sealed by mapc, the weights' zero
  pattern matches the sealed digest, no mask-like tensor,
  no leaked path or traceback).
Invariant: the model is not changed.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import numpy_helper

from .base import PassError, PassResult
from .graph_utils import oriented, rowwise_scale

LEAK = re.compile(r"(^|[\s\"'(=])(/(home|root|tmp|usr|opt|work|Users|var)/|[A-Za-z]:\\\\)|Traceback \(most recent")


def _strings(model: onnx.ModelProto):
    yield model.doc_string
    for p in model.metadata_props:
        yield p.value
    g = model.graph
    yield g.doc_string
    for n in g.node:
        yield n.doc_string
        for p in n.metadata_props:
            yield p.value
        for a in n.attribute:
            if a.type == onnx.AttributeProto.STRING:
                yield a.s.decode(errors="replace")


def _check_stripped(key: str, a: np.ndarray, mask: np.ndarray) -> str | None:
    """A weight that strip_dead_channels shrank: output channels removed (dim 0) and/or input slices (dim 1).

    Removed output channels are the mask's all-zero rows, so when only dim 0
    shrank the exact masked pattern of the kept rows is checked; when input
    slices were removed too, the weight may hold no more non-zeros than the
    mask allows.
    """
    if a.ndim != mask.ndim or any(x > y for x, y in zip(a.shape, mask.shape)) or a.shape[2:] != mask.shape[2:]:
        return f"{key}: shape {a.shape} does not fit its mask {mask.shape}"
    if int(np.count_nonzero(a)) > int(mask.sum()):
        return f"{key}: {np.count_nonzero(a)} non-zeros but its mask keeps only {int(mask.sum())}"
    if a.shape[1:] == mask.shape[1:]:
        live = mask.reshape(mask.shape[0], -1).any(1)
        if live.sum() == a.shape[0] and np.any(a[mask[live] == 0]):
            return f"{key}: non-zeros at masked positions of its kept channels"
    return None


def artifact_checks(model: onnx.ModelProto) -> list[dict]:
    """The audit's checks that need only the artifact: [{check, passed, detail}] in a fixed order."""
    from .seal import read_metadata, zero_pattern_digest
    meta = read_metadata(model)
    out = []

    def record(name: str, passed: bool, detail: str) -> None:
        out.append({"check": name, "passed": bool(passed), "detail": detail})

    sealed = meta.get("mapc.zero_pattern_sha256")
    record("sealed", isinstance(sealed, str),
           "mapc.* metadata present" if sealed else "no mapc.zero_pattern_sha256: not a sealed mapc artifact")
    actual = zero_pattern_digest(model)
    record("zero_pattern", sealed == actual,
           "the weights' zeros match the sealed digest" if sealed == actual
           else "the weights' zero pattern differs from the sealed digest: weights were edited after sealing")
    suspicious = [t.name for t in model.graph.initializer if "mask" in t.name.lower() or t.name.lower().endswith("_orig")]
    record("no_mask_tensors", not suspicious, f"mask-like tensors: {suspicious[:3]}" if suspicious else "none")
    leak = next((s for s in _strings(model) if s and LEAK.search(s)), None)
    record("no_leaks", leak is None, "no paths or tracebacks in strings" if leak is None
           else f"a string leaks a path or traceback: {leak[:60]!r}")
    return out


class Audit:
    name = "audit"
    description = "fail if a masked position is non-zero, an unmasked original weight or mask remains, or paths leak"

    def __init__(self, masks: dict[str, np.ndarray], originals: dict[str, np.ndarray], require_seal: bool = True):
        self.masks = masks
        self.originals = originals
        self.require_seal = require_seal   # False only for unit tests on unsealed graphs

    def _applies(self, check: str) -> bool:
        if check in ("sealed", "zero_pattern"):
            return self.require_seal
        return True

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        problems = []
        checked = {}
        for key, mask in self.masks.items():
            zeros = mask == 0
            if not zeros.any():
                continue
            if key in arrays and arrays[key].shape != mask.shape:
                problem = _check_stripped(key, arrays[key], mask)
                if problem:
                    problems.append(problem)
                checked[key] = [key]
                continue
            if key in arrays and arrays[key].shape == mask.shape:
                cands = [(key, arrays[key])]
            else:
                cands = []
                for n, view, _ in oriented(arrays, mask.shape):   # the orientation that carries the mask's zeros
                    if not np.any(view[zeros]) and all(n != c for c, _ in cands):
                        cands.append((n, view))
            if not cands:
                problems.append(f"weight {key!r} not found with its masked positions at zero")
                continue
            for n, a in cands:
                nz = int(np.count_nonzero(a[zeros]))
                if nz:
                    problems.append(f"{n} (parameter {key!r}) holds {nz} non-zeros at masked positions")
            checked[key] = [n for n, _ in cands]
            orig = self.originals.get(key)
            if orig is not None:
                for n, a in arrays.items():
                    if (a.shape == orig.shape and np.array_equal(a, orig)) or \
                            (orig.ndim == 2 and a.shape == orig.T.shape and np.array_equal(a, orig.T)):
                        problems.append(f"initializer {n} equals the unmasked original of {key!r}")
                    elif a.shape == orig.shape and np.any(a[zeros]) and rowwise_scale(a, orig) is not None:
                        problems.append(f"initializer {n} is a per-channel rescaling of the unmasked original of {key!r}")
        if self.masks and not any((np.asarray(m) == 0).any() for m in self.masks.values()):
            problems.append("the mask prunes nothing: the artifact would be the unprotected model")
        problems += [f"{c['check']}: {c['detail']}" for c in artifact_checks(model)
                     if not c["passed"] and self._applies(c["check"])]
        if problems:
            raise PassError(self.name, "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
        return PassResult(model, False, {"masked_weights_checked": checked})

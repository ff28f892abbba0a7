"""Weight provenance: are a suspect model's weights derived from the owner's artifact?

The watermark (``mapc.watermark``) is a black-box test and does not survive an attacker who trains
the artifact further (README, "Ownership"). A holder who ships the stolen weights still ships
*them*: fine-tuning moves weights a little, an input transform in front of the model leaves them
alone. This test compares weight tensors directly (the suspect's ONNX initializers, or the suspect
model exported to ONNX, against the owner's reference artifact):

    for each reference weight R (float, >= 2 dimensions, >= 64 entries) and each suspect tensor S of the
    same shape (or of the transposed shape, for 2-D):
        r = Pearson correlation of R and S after each output row is scaled to unit RMS (invariant to the
            per-channel scale that folding BatchNorm puts on a convolution)
        z = atanh(r) * sqrt(n - 3)            (Fisher; n entries; ~ N(0, 1) for unrelated tensors)
    p   = m * min over R of  c_R * P(N(0, 1) >= z_R)   (Bonferroni over the m reference tensors and the
                                                        c_R candidates each; one-sided)
    effect = median over matched R of the best r

DERIVED when p < ``ALPHA`` and effect >= ``MIN_EFFECT``. Weights of independently trained models of the
same architecture are unrelated entry by entry (hidden units are not aligned), so r is near 0 for them.
numpy and onnx only.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

ALPHA = 1e-6          # as the watermark test
MIN_EFFECT = 0.5      # median correlation of the matched weights
MIN_ENTRIES = 64


def weight_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Float initializers with at least two dimensions and ``MIN_ENTRIES`` entries."""
    out = {}
    for init in model.graph.initializer:
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
            continue
        if len(init.dims) < 2 or int(np.prod(init.dims)) < MIN_ENTRIES:
            continue
        out[init.name] = numpy_helper.to_array(init).astype(np.float64)
    return out


def _rows_unit(t: np.ndarray) -> np.ndarray:
    flat = t.reshape(t.shape[0], -1)
    rms = np.sqrt((flat ** 2).mean(1, keepdims=True))
    return np.where(rms > 0, flat / np.where(rms > 0, rms, 1.0), 0.0).ravel()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    x, y = _rows_unit(a), _rows_unit(b)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else 0.0


def log10_normal_tail(z: float) -> float:
    """log10 P(N(0,1) >= z), accurate in the far tail (the tail underflows floats for a copied model)."""
    if z < 30:
        return math.log10(max(0.5 * math.erfc(z / math.sqrt(2)), 1e-300))
    return (-z * z / 2 - math.log(z) - 0.5 * math.log(2 * math.pi)) / math.log(10)


def weight_provenance(suspect: onnx.ModelProto, reference: onnx.ModelProto) -> dict:
    """The test of the module docstring: {derived, p_value, log10_p, effect, matched, tensors, per_tensor}."""
    ref, sus = weight_tensors(reference), weight_tensors(suspect)
    per = []
    for name, r_t in ref.items():
        cands = [s for s in sus.values() if s.shape == r_t.shape]
        if r_t.ndim == 2:
            cands += [s.T for s in sus.values() if s.shape == r_t.shape[::-1] and r_t.shape[0] != r_t.shape[1]]
        if not cands:
            continue
        best = max(correlation(r_t, s) for s in cands)
        n = r_t.size
        z = math.atanh(min(max(best, -0.999999), 0.999999)) * math.sqrt(max(n - 3, 1))
        per.append({"tensor": name, "entries": int(n), "candidates": len(cands), "r": best,
                    "log10_p": math.log10(len(cands)) + log10_normal_tail(z)})
    if not per:
        return {"derived": False, "p_value": 1.0, "log10_p": 0.0, "effect": 0.0, "matched": 0, "tensors": len(ref),
                "per_tensor": []}
    log10_p = min(0.0, math.log10(len(ref)) + min(t["log10_p"] for t in per))
    effect = float(np.median([t["r"] for t in per]))
    return {"derived": bool(log10_p < math.log10(ALPHA) and effect >= MIN_EFFECT), "p_value": _p_text(log10_p),
            "log10_p": log10_p, "effect": effect, "matched": len(per), "tensors": len(ref), "per_tensor": per}


def _p_text(log10_p: float) -> float | str:
    """The p-value as a number, or as text below the float range (``watermark.p_text``)."""
    from .watermark import p_text
    return 10 ** log10_p if log10_p > -300 else p_text(log10_p)

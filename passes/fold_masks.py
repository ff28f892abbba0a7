"""fold_masks: bake binary masks into the weights they apply to.

Invariant: for every mask M keyed by a torch parameter name, the initializer
W holding that parameter becomes W' = where(M, W, 0): masked positions are
exact (+0.0) zeros, kept positions are bit-identical, the dtype and the
initializer's name are unchanged, and no mask tensor, Mul node or copy of
the unmasked weight is added to the graph.

Locating the initializer (the exporter may rename or transpose weights):
1. an initializer whose name is the parameter name and whose shape is M's;
2. otherwise, when the original values are given, every initializer whose
   values equal the original exactly, or its transpose for 2-D weights (a
   Linear exported as MatMul stores W^T). A weight shared by several nodes is
   one initializer and is masked once; duplicated copies are all masked;
3. otherwise, an initializer of the same shape whose every output row is a
   scalar multiple of the original's (an exporter folded BatchNorm into the
   Conv: W' = W * s per output channel). Masking commutes with that scale,
   (W*s)*M = (W*M)*s, so the same mask applies.
A mask that matches nothing is an error: silently shipping an unmasked
weight would ship an unprotected model.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .base import PassError, PassResult
from .graph_utils import oriented, rowwise_scale


def _find(inits: dict[str, onnx.TensorProto], arrays: dict[str, np.ndarray], key: str,
          mask: np.ndarray, original: np.ndarray | None) -> list[tuple[str, bool]]:
    """(initializer name, transposed) pairs holding parameter ``key``."""
    if key in inits and tuple(inits[key].dims) == mask.shape:
        return [(key, False)]
    if original is None:
        return []
    found = []
    for name, view, transposed in oriented(arrays, original.shape):
        if np.array_equal(view, original) and all(name != n for n, _ in found):
            found.append((name, transposed))
    if not found:
        found = [(name, False) for name, arr in arrays.items() if rowwise_scale(arr, original) is not None]
    return found


class FoldMasks:
    name = "fold_masks"
    description = "bake binary masks into their weights as exact zeros (by name, else by value or transposed value)"

    def __init__(self, masks: dict[str, np.ndarray], originals: dict[str, np.ndarray] | None = None):
        self.masks = masks
        self.originals = originals or {}

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        arrays: dict[str, np.ndarray] = {}
        applied: dict[str, dict] = {}
        for key, mask in self.masks.items():
            mask = np.asarray(mask)
            if not np.isin(mask, (0, 1)).all():
                raise PassError(self.name, f"mask for {key!r} is not binary")
            original = self.originals.get(key)
            if original is not None and original.shape != mask.shape:
                raise PassError(self.name, f"mask for {key!r} has shape {mask.shape}, weight has {original.shape}")
            if key not in inits and original is not None and not arrays:
                arrays = {n: numpy_helper.to_array(t) for n, t in inits.items()}
            targets = _find(inits, arrays, key, mask, original)
            if not targets:
                raise PassError(self.name, f"no initializer holds parameter {key!r} "
                                           f"(shape {mask.shape}); export kept neither its name nor its values")
            for init_name, transposed in targets:
                t = inits[init_name]
                w = numpy_helper.to_array(t)
                m = (mask.T if transposed else mask).astype(bool)
                folded = np.where(m, w, np.zeros((), w.dtype)).astype(w.dtype)
                t.CopyFrom(numpy_helper.from_array(folded, init_name))
                arrays.pop(init_name, None)
            applied[key] = {"initializers": [n for n, _ in targets],
                            "transposed": [tr for _, tr in targets],
                            "zeros": int(mask.size - mask.sum()), "size": int(mask.size)}
        return PassResult(model, any(a["zeros"] for a in applied.values()), {"masks": applied})

"""seal: write the artifact's own metadata.

Invariant: the graph is untouched; ``metadata_props`` afterwards holds exactly
the ``mapc.*`` keys below (values are strings, JSON where structured), so
``mapc verify`` needs no preprocessing flags:

    mapc.version, mapc.mode, mapc.authorized, mapc.unauthorized (JSON lists of the
    domain names; in the data-free mode the unauthorized ones were only measured),
    mapc.learned_from (JSON: what the mask learned from, real rows or synthesized),
    mapc.preprocess (JSON: size, channels, mean, std), mapc.granularity,
    mapc.mask_sha256, mapc.original_weights_sha256, mapc.report_schema,
    mapc.zero_pattern_sha256 (computed here from the final weights)

Only digests of the mask and of the original weights are written, never
the tensors. ``mapc.zero_pattern_sha256`` lets anyone holding the artifact
alone check that its weights still carry the zeros the mask put there:
SHA-256 over (name, shape, packed bits of W == 0) of every initializer with
two or more dimensions, in name order. Restoring a pruned weight, or any
other edit of the zero pattern, changes it.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx

from .base import PassResult


def digest_arrays(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def zero_pattern_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of where the weight tensors (2+ dims) are exactly zero; see the module docstring."""
    from onnx import numpy_helper
    h = hashlib.sha256()
    for t in sorted((t for t in model.graph.initializer if len(t.dims) >= 2), key=lambda t: t.name):
        a = numpy_helper.to_array(t)
        h.update(t.name.encode())
        h.update(str(a.shape).encode())
        h.update(np.packbits(a.reshape(-1) == 0).tobytes())
    return h.hexdigest()


class Seal:
    name = "seal"
    description = "write mapc.* metadata: version, mode, domains, preprocessing, mask and weight digests"

    def __init__(self, metadata: dict[str, object]):
        self.metadata = {k if k.startswith("mapc.") else f"mapc.{k}": v for k, v in metadata.items()}

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        kept = [p for p in model.metadata_props if not p.key.startswith("mapc.")]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        sealed = {**self.metadata, "mapc.zero_pattern_sha256": zero_pattern_digest(model)}
        for key, value in sorted(sealed.items()):
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=text))
        return PassResult(model, True, {"keys": sorted(sealed)})


def read_metadata(model: onnx.ModelProto) -> dict[str, object]:
    """mapc.* metadata with JSON values decoded."""
    out = {}
    for p in model.metadata_props:
        if p.key.startswith("mapc."):
            try:
                out[p.key] = json.loads(p.value)
            except json.JSONDecodeError:
                out[p.key] = p.value
    return out

"""check: the artifact is a valid ONNX model.

Invariant: nothing is changed; ``onnx.checker`` full check and strict shape
inference must pass, otherwise the pipeline stops with the checker's message.
"""
from __future__ import annotations

import onnx

from .base import PassError, PassResult


class Check:
    name = "check"
    description = "onnx.checker full check and strict shape inference"

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        try:
            onnx.checker.check_model(model, full_check=True)
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise PassError(self.name, " ".join(str(e).split())[:400])
        return PassResult(model, False, {"opset": [f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import]})

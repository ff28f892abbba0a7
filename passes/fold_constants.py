"""fold_constants: evaluate subgraphs that depend only on initializers.

Invariant: the computed function is unchanged and initializer names are
kept (later passes and the audit find weights by name). The torch exporter
without its optimizer emits e.g. Shape -> Expand chains that build a zero
bias for bias-free Conv layers; those become plain initializers. Delegates
to onnxscript's constant folder (pure ONNX, no torch).
"""
from __future__ import annotations

import onnx

from .base import PassResult


class FoldConstants:
    name = "fold_constants"
    description = "evaluate constant subgraphs (onnxscript constant folder) and drop unused nodes"

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        import onnx_ir as ir
        from onnxscript import optimizer

        ir_model = ir.from_proto(model)
        result = optimizer.fold_constants(ir_model)
        optimizer.remove_unused_nodes(ir_model)
        out = ir.to_proto(ir_model)
        changed = bool(getattr(result, "modified", True)) or len(out.graph.node) != len(model.graph.node)
        return PassResult(out, changed, {"nodes_removed": len(model.graph.node) - len(out.graph.node)})

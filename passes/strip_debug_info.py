"""strip_debug_info: remove what would leak the build machine from the artifact.

Invariant: the computed function is unchanged; afterwards no doc string,
node metadata (the torch exporter stores stack traces with file paths and
module names there), value_info annotation or producer-side model metadata
remains. Model-level metadata_props are cleared too; ``seal`` writes the
artifact's own metadata afterwards.
"""
from __future__ import annotations

import onnx

from .base import PassResult


def _clear(obj) -> int:
    """Empty ``doc_string`` and ``metadata_props`` where the proto has them; count what was cleared."""
    n = 0
    if getattr(obj, "doc_string", ""):
        obj.doc_string = ""
        n += 1
    if hasattr(obj, "metadata_props") and len(obj.metadata_props):
        del obj.metadata_props[:]
        n += 1
    return n


def _strip_graph(graph: onnx.GraphProto) -> int:
    n = _clear(graph)
    for item in list(graph.input) + list(graph.output) + list(graph.value_info) + list(graph.initializer):
        n += _clear(item)
    for node in graph.node:
        n += _clear(node)
        for attr in node.attribute:
            if attr.doc_string:
                attr.doc_string = ""
                n += 1
            if attr.type == onnx.AttributeProto.GRAPH:
                n += _strip_graph(attr.g)
            for g in attr.graphs:
                n += _strip_graph(g)
    return n


class StripDebugInfo:
    name = "strip_debug_info"
    description = "remove doc strings, node metadata (exporter stack traces, file paths) and model metadata"

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        n = _strip_graph(model.graph)
        if model.doc_string:
            model.doc_string = ""
            n += 1
        if len(model.metadata_props):
            del model.metadata_props[:]
            n += 1
        for f in model.functions:
            if f.doc_string:
                f.doc_string = ""
                n += 1
            for node in f.node:
                if node.doc_string or len(node.metadata_props):
                    node.doc_string = ""
                    del node.metadata_props[:]
                    n += 1
        return PassResult(model, n > 0, {"fields_cleared": n})

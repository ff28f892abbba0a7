"""Helpers shared by the passes: lookups over an ONNX GraphProto, and the onnx-graphsurgeon round trip.

Graph edits that change structure go through onnx-graphsurgeon (``export_graph``
runs its ``cleanup().toposort()``, which removes nodes and constants nothing
reads, subgraph uses included); ``export_graph`` keeps what the model proto
carries besides the graph (opsets, IR version, producer, metadata).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper


def export_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` cleaned up (dead nodes and unused constants removed), sorted, exported with ``like``'s model fields."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = like.ir_version
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field, getattr(like, field))
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    return out


def set_conv_bias(graph: gs.Graph, conv: gs.Node, values: np.ndarray) -> None:
    """Give ``conv`` the bias ``values``: overwrite its constant bias, or add one named after its weight."""
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        conv.inputs[2].values = values
        return
    taken = set(graph.tensors())
    base = conv.inputs[1].name.rsplit(".", 1)[0] + ".folded_bias"
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    while len(conv.inputs) < 2:
        conv.inputs.append(gs.Variable.empty())
    if len(conv.inputs) == 2:
        conv.inputs.append(gs.Constant(name, values))
    else:
        conv.inputs[2] = gs.Constant(name, values)


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> nodes that read it (graph outputs are not nodes; see ``is_graph_output``)."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                out[name].append(node)
    return out


def is_graph_output(graph: onnx.GraphProto, name: str) -> bool:
    return any(o.name == name for o in graph.output)


def initializer_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def get_array(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    t = inits.get(name)
    return None if t is None else numpy_helper.to_array(t)


def set_array(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    """Replace or add initializer ``name``."""
    t = numpy_helper.from_array(np.ascontiguousarray(value), name)
    if name in inits:
        inits[name].CopyFrom(t)
    else:
        graph.initializer.append(t)
        inits[name] = graph.initializer[-1]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} \
        | {i.name for i in graph.input}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def oriented(arrays: dict[str, np.ndarray], shape: tuple[int, ...]):
    """(name, view, transposed) for every initializer that can hold a weight of ``shape``: as stored, or
    transposed (a Linear exported as MatMul stores W^T). A square 2-D weight yields both orientations; the
    caller's test (equal values, the mask's zeros) tells which one is the weight."""
    for name, a in arrays.items():
        if a.shape == tuple(shape):
            yield name, a, False
        if a.ndim == 2 and a.T.shape == tuple(shape):
            yield name, a.T, True


def rowwise_scale(a: np.ndarray, w: np.ndarray, rtol: float = 1e-4) -> np.ndarray | None:
    """Per-output-row scales s with a[o] = s[o] * w[o] (a Conv weight with BatchNorm folded in), or None.

    Least-squares s[o] = <a[o], w[o]> / <w[o], w[o]>, accepted when every row matches to ``rtol``
    of the row's largest entry. Rows of w that are all zero must be zero in a too.
    """
    if a.shape != w.shape or a.ndim < 2:
        return None
    A = a.reshape(a.shape[0], -1).astype(np.float64)
    W = w.reshape(w.shape[0], -1).astype(np.float64)
    ww = (W * W).sum(1)
    s = np.divide((A * W).sum(1), ww, out=np.zeros_like(ww), where=ww > 0)
    err = np.abs(A - s[:, None] * W).max(1)
    scale = np.maximum(np.abs(A).max(1), np.abs(s) * np.abs(W).max(1))
    if np.all(err <= rtol * np.maximum(scale, 1e-12)):
        return s
    return None

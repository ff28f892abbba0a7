"""Small helpers over an ONNX GraphProto shared by the passes (pure functions)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> nodes that read it (graph outputs are not nodes; see ``is_graph_output``)."""
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                out[name].append(node)
    return out


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


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


def remove_unused_initializers(graph: onnx.GraphProto) -> list[str]:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:  # subgraphs may read outer initializers
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else []) + list(a.graphs):
                used |= {i for sn in g.node for i in sn.input}
    dead = [t.name for t in graph.initializer if t.name not in used]
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return dead


def remove_dead_nodes(graph: onnx.GraphProto) -> int:
    """Drop nodes none of whose outputs is read by another node or is a graph output."""
    removed = 0
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            return removed
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)


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

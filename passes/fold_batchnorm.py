"""fold_batchnorm: Conv followed by BatchNormalization becomes one Conv.

For per-output-channel scale s = gamma / sqrt(var + eps):

    W'[o] = W[o] * s[o]          b'[o] = (b[o] - mean[o]) * s[o] + beta[o]

Invariant: the function is unchanged up to float rounding (computed in
float64, stored in the weight's dtype); the Conv weight keeps its
initializer name and zeros stay exact +0.0 zeros, so masked positions remain
masked. Folds only when the Conv output feeds nothing but the BatchNorm, all
BN parameters are constants and the Conv weight (and bias) is not shared.

The graph is edited with onnx-graphsurgeon: the Conv takes over the
BatchNorm's output tensor, the BatchNorm is disconnected, and
``graph.cleanup().toposort()`` removes it and its now unused constants.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .base import PassResult
from .graph_utils import export_graph, set_conv_bias


def _foldable(graph: gs.Graph, conv: gs.Node) -> gs.Node | None:
    """The BatchNormalization that alone reads ``conv``'s output, when the pair can be folded."""
    if conv.op != "Conv" or len(conv.inputs) < 2 or not isinstance(conv.inputs[1], gs.Constant):
        return None
    out = conv.outputs[0]
    if len(out.outputs) != 1 or any(out is o for o in graph.outputs):
        return None
    bn = out.outputs[0]
    if bn.op != "BatchNormalization" or len(bn.outputs) != 1 or bn.inputs[0] is not out:
        return None
    if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return None
    if len(conv.inputs[1].outputs) != 1:
        return None
    if len(conv.inputs) > 2 and conv.inputs[2].name and (
            not isinstance(conv.inputs[2], gs.Constant) or len(conv.inputs[2].outputs) != 1):
        return None
    return bn


class FoldBatchNorm:
    name = "fold_batchnorm"
    description = "merge BatchNormalization into the preceding Conv (W*s, (b-mean)*s+beta)"

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        graph = gs.import_onnx(model)
        folded = []
        for conv in list(graph.nodes):
            bn = _foldable(graph, conv)
            if bn is None:
                continue
            weight = conv.inputs[1]
            w = weight.values
            gamma, beta, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
            s = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
            has_bias = len(conv.inputs) > 2 and conv.inputs[2].name
            b = conv.inputs[2].values.astype(np.float64) if has_bias else np.zeros_like(mean)
            w_new = (w.astype(np.float64) * s.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
            w_new[w == 0] = 0
            weight.values = w_new
            set_conv_bias(graph, conv, ((b - mean) * s + beta).astype(w.dtype))
            conv.outputs = bn.outputs          # the Conv now produces the BatchNorm's output
            bn.outputs = []
            folded.append(weight.name)
        if not folded:
            return PassResult(model, False, {"folded": [], "initializers_removed": 0})
        before = len(model.graph.initializer)
        out = export_graph(graph, model)
        return PassResult(out, True, {"folded": folded, "initializers_removed": before - len(out.graph.initializer)})

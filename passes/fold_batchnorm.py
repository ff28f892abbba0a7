"""fold_batchnorm: Conv followed by BatchNormalization becomes one Conv.

For per-output-channel scale s = gamma / sqrt(var + eps):

    W'[o] = W[o] * s[o]          b'[o] = (b[o] - mean[o]) * s[o] + beta[o]

Invariant: the function is unchanged up to float rounding (computed in
float64, stored in the weight's dtype); the Conv weight keeps its
initializer name and zeros stay exact +0.0 zeros, so masked positions remain
masked. Folds only when the Conv output feeds nothing but the BatchNorm, all
BN parameters are initializers and the Conv weight is not shared.
"""
from __future__ import annotations

import numpy as np
import onnx

from .base import PassResult
from .graph_utils import (attr, consumers, get_array, initializer_map, is_graph_output,
                          remove_unused_initializers, set_array, unique_name)


class FoldBatchNorm:
    name = "fold_batchnorm"
    description = "merge BatchNormalization into the preceding Conv (W*s, (b-mean)*s+beta)"

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        inits = initializer_map(graph)
        folded = []
        while True:
            cons = consumers(graph)
            pair = None
            for conv in graph.node:
                if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
                    continue
                out = conv.output[0]
                users = cons.get(out, [])
                if len(users) != 1 or is_graph_output(graph, out):
                    continue
                bn = users[0]
                if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or bn.input[0] != out:
                    continue
                if not all(n in inits for n in bn.input[1:5]):
                    continue
                if len(cons.get(conv.input[1], [])) != 1:
                    continue
                has_bias = len(conv.input) > 2 and conv.input[2]
                if has_bias and (conv.input[2] not in inits or len(cons.get(conv.input[2], [])) != 1):
                    continue
                pair = (conv, bn)
                break
            if pair is None:
                break
            conv, bn = pair
            w = get_array(inits, conv.input[1])
            gamma, beta, mean, var = (get_array(inits, n).astype(np.float64) for n in bn.input[1:5])
            eps = attr(bn, "epsilon", 1e-5)
            s = gamma / np.sqrt(var + eps)
            has_bias = len(conv.input) > 2 and conv.input[2]
            b = get_array(inits, conv.input[2]).astype(np.float64) if has_bias else np.zeros_like(mean)
            w_new = (w.astype(np.float64) * s.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
            w_new[w == 0] = 0
            b_new = ((b - mean) * s + beta).astype(w.dtype)
            set_array(graph, inits, conv.input[1], w_new)
            if has_bias:
                set_array(graph, inits, conv.input[2], b_new)
            else:
                bias_name = unique_name(graph, conv.input[1].rsplit(".", 1)[0] + ".folded_bias")
                set_array(graph, inits, bias_name, b_new)
                while len(conv.input) < 3:
                    conv.input.append("")
                conv.input[2] = bias_name
            conv.output[0] = bn.output[0]
            graph.node.remove(bn)
            folded.append(conv.input[1])
        removed = remove_unused_initializers(graph) if folded else []
        return PassResult(model, bool(folded), {"folded": folded, "initializers_removed": len(removed)})

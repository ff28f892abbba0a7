"""strip_dead_channels: remove Conv output channels whose weights are all zero.

A Conv output channel o with W[o] == 0 computes the constant b[o] everywhere.
Follow that value through channel-wise nodes (Relu, BatchNormalization,
MaxPool, Identity), which keep it constant (c -> relu(c), c -> (c - mean) *
gamma / sqrt(var + eps) + beta), to its consumers, and remove the channel
there too:

- Conv (group 1):          W2' = W2[:, keep];   if the conv pads nothing,
                           b2' = b2 + sum_{o dead} c_o * sum_{kh,kw} W2[:, o]
- Flatten -> Gemm(transB): W' = W[:, keep columns]; b' = b + sum_{o dead} c_o * sum_{p} W[:, o*HW + p]
  (a Reshape to [N, C*H*W] counts as Flatten)
- BatchNormalization in the chain: its parameters are sliced.

Channel counts: only as many dead channels are removed as keep the remaining
count a multiple of ``align`` (8 by default), because onnxruntime's blocked
Conv kernels run odd channel counts on a slower path.

Invariant: the function is unchanged (up to float rounding of the folded
bias). A dead channel whose constant is non-zero is kept when a consumer
cannot absorb it exactly (a padded Conv sees zeros at the border, not c);
a channel that reaches anything else (residual Add, Concat, a graph output,
a grouped Conv) is kept. The model only ever loses parameters and FLOPs.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from .base import PassResult
from .graph_utils import (attr, consumers, export_graph, get_array, initializer_map, is_graph_output, set_array,
                          unique_name)

CHANNELWISE = {"Relu", "BatchNormalization", "MaxPool", "Identity"}


def _shape_map(model: onnx.ModelProto) -> dict[str, list]:
    """Inferred shapes (None for unknown dims), ignoring value_info that earlier slicing made stale."""
    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    del fresh.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(fresh, data_prop=True)
    except Exception:
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return out


def _pads_zero(node: onnx.NodeProto) -> bool:
    if (attr(node, "auto_pad", b"NOTSET") or b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return False
    return not any(attr(node, "pads", []) or [])


def _propagate(node: onnx.NodeProto, c: np.ndarray, inits) -> np.ndarray:
    if node.op_type == "Relu":
        return np.maximum(c, 0)
    if node.op_type == "BatchNormalization":
        g, b, m, v = (get_array(inits, n).astype(np.float64) for n in node.input[1:5])
        return (c - m) * g / np.sqrt(v + attr(node, "epsilon", 1e-5)) + b
    return c


class StripDeadChannels:
    name = "strip_dead_channels"
    description = "remove Conv output channels whose weights are all zero, and their consumers' input slices"

    def __init__(self, align: int = 8):
        # onnxruntime's blocked (NCHWc) Conv kernels want channel counts in multiples of 8 or 16;
        # an odd count falls back to a slower path. Keep enough dead channels that the kept count
        # stays a multiple of ``align`` (1 disables), so stripping never costs speed.
        self.align = max(1, int(align))

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        removed: dict[str, int] = {}
        shapes = None
        while True:
            graph = model.graph
            inits = initializer_map(graph)
            cons = consumers(graph)
            plan = None
            for conv in graph.node:
                if conv.op_type != "Conv" or attr(conv, "group", 1) != 1 or conv.input[1] not in inits:
                    continue
                w = get_array(inits, conv.input[1])
                dead = np.flatnonzero(~w.reshape(w.shape[0], -1).any(1))
                if len(dead) == 0 or len(dead) == w.shape[0] or len(cons.get(conv.input[1], [])) != 1:
                    continue
                if shapes is None:
                    shapes = _shape_map(model)
                plan = self._plan(model, conv, dead, w, inits, cons, shapes)
                if plan is not None:
                    break
            if plan is None:
                break
            self._apply(model, plan, inits)
            removed[plan["conv"].input[1]] = len(plan["dead"])
            shapes = None
        if removed:
            del model.graph.value_info[:]  # shapes of sliced values changed; re-inferred on demand
            model = export_graph(gs.import_onnx(model), model)   # drop what nothing reads any more
        return PassResult(model, bool(removed), {"channels_removed": removed})

    def _plan(self, model, conv, dead, w, inits, cons, shapes):
        graph = model.graph
        has_bias = len(conv.input) > 2 and conv.input[2]
        if has_bias and (conv.input[2] not in inits or len(cons.get(conv.input[2], [])) != 1):
            return None
        const = get_array(inits, conv.input[2]).astype(np.float64) if has_bias else np.zeros(w.shape[0])
        chain, value = [], conv.output[0]
        while True:
            users = cons.get(value, [])
            if is_graph_output(graph, value) or not users:
                return None
            if len(users) == 1 and users[0].op_type in CHANNELWISE and len(users[0].output) == 1:
                node = users[0]
                if node.op_type == "BatchNormalization":
                    if not all(n in inits for n in node.input[1:5]) or any(
                            len(cons.get(n, [])) != 1 for n in node.input[1:5]):
                        return None
                const = _propagate(node, const, inits)
                chain.append(node)
                value = node.output[0]
                continue
            break
        sinks = []
        for user in cons[value]:
            if user.op_type == "Conv" and user.input[0] == value and attr(user, "group", 1) == 1 \
                    and user.input[1] in inits and len(cons.get(user.input[1], [])) == 1:
                sinks.append(("conv", user, None))
            elif user.op_type in ("Flatten", "Reshape") and self._is_flatten(user, shapes, value):
                gemms = cons.get(user.output[0], [])
                if len(gemms) != 1 or is_graph_output(graph, user.output[0]):
                    return None
                g = gemms[0]
                if g.op_type != "Gemm" or attr(g, "transB", 0) != 1 or attr(g, "transA", 0) != 0 \
                        or g.input[0] != user.output[0] or g.input[1] not in inits \
                        or len(cons.get(g.input[1], [])) != 1:
                    return None
                hw = int(np.prod(shapes[value][2:]))
                sinks.append(("gemm", g, (user, hw)))
            else:
                return None
        # channels whose constant a sink cannot absorb exactly stay
        absorbable = np.ones(len(dead), bool)
        nonzero = const[dead] != 0
        for kind, node, _ in sinks:
            if kind == "conv" and not _pads_zero(node):
                absorbable &= ~nonzero
        dead = dead[absorbable]
        n_keep = -(-(w.shape[0] - len(dead)) // self.align) * self.align
        dead = dead[:max(0, w.shape[0] - n_keep)]
        if len(dead) == 0:
            return None
        keep = np.setdiff1d(np.arange(w.shape[0]), dead)
        return {"conv": conv, "dead": dead, "keep": keep, "const": const, "chain": chain, "sinks": sinks,
                "has_bias": has_bias}

    @staticmethod
    def _is_flatten(node, shapes, value) -> bool:
        if node.op_type == "Flatten":
            return attr(node, "axis", 1) == 1
        src, dst = shapes.get(value), shapes.get(node.output[0])
        return (src is not None and dst is not None and len(src) == 4 and len(dst) == 2
                and None not in src[1:] and dst[1] == int(np.prod(src[1:])))

    def _apply(self, model, plan, inits):
        graph = model.graph
        conv, dead, keep, const = plan["conv"], plan["dead"], plan["keep"], plan["const"]
        w = get_array(inits, conv.input[1])
        set_array(graph, inits, conv.input[1], w[keep])
        if plan["has_bias"]:
            set_array(graph, inits, conv.input[2], get_array(inits, conv.input[2])[keep])
        for node in plan["chain"]:
            if node.op_type == "BatchNormalization":
                for n in node.input[1:5]:
                    set_array(graph, inits, n, get_array(inits, n)[keep])
        for kind, node, extra in plan["sinks"]:
            w2 = get_array(inits, node.input[1])
            if kind == "conv":
                shift = (w2[:, dead].astype(np.float64).sum(axis=tuple(range(2, w2.ndim))) * const[dead]).sum(1)
                set_array(graph, inits, node.input[1], np.ascontiguousarray(w2[:, keep]))
            else:
                flat, hw = extra
                cols = np.arange(w2.shape[1]).reshape(-1, hw)
                shift = (w2[:, cols[dead]].astype(np.float64).sum(2) * const[dead]).sum(1)
                set_array(graph, inits, node.input[1], np.ascontiguousarray(w2[:, cols[keep].ravel()]))
                if flat.op_type == "Reshape":  # a Reshape to [N, C*H*W] becomes Flatten(axis=1)
                    new = helper.make_node("Flatten", [flat.input[0]], [flat.output[0]], axis=1, name=flat.name)
                    flat.CopyFrom(new)
            if np.any(shift):
                dtype = w2.dtype
                if len(node.input) > 2 and node.input[2]:
                    b2 = get_array(inits, node.input[2])
                    set_array(graph, inits, node.input[2], (b2.astype(np.float64) + shift).astype(dtype))
                else:
                    bname = unique_name(graph, node.input[1].rsplit(".", 1)[0] + ".folded_bias")
                    set_array(graph, inits, bname, shift.astype(dtype))
                    while len(node.input) < 3:
                        node.input.append("")
                    node.input[2] = bname

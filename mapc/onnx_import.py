"""An ONNX graph imported back into torch, so an attack can train the shipped artifact itself.

Invariant: ``OnnxModule(model)(x)`` computes the graph's first output from its
first input with the graph's own initializers, node by node in the graph's
(topological) order, and matches onnxruntime within 1e-4 on the artifacts mapc
emits (tested on every sample model and the tiny test models). Every floating
initializer becomes a trainable ``nn.Parameter`` keyed by its ONNX name (pruned
weights included: an attacker may regrow them); integer initializers and
Constant nodes are fixed. ``write_back`` puts trained parameters into a copy of
the ONNX model under the same names, so attacked weights are measured by
onnxruntime through the same path as the artifact.

An op outside ``OPS`` is bad input: the importer names it rather than guessing.
The importer is mapc's own rather than a general converter (onnx2torch needs
torchvision at import time and renames parameters, which would break
``write_back``); it covers the op set torch.onnx.export emits for
convolutional and transformer classifiers after mapc's passes.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from .errors import UserError


MIN_OPSET = 13


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _pads(a: dict, kernel: list[int]) -> tuple[list[int], bool, list[int]]:
    """(pads at the start of each spatial dim, whether they equal the end pads, pads at the end)."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        raise UserError(f"auto_pad={auto} is not supported by the importer; re-export with explicit pads")
    pads = list(a.get("pads", [0] * (2 * len(kernel))))
    n = len(kernel)
    begin, end = pads[:n], pads[n:]
    return begin, begin == end, end


def _conv(node, a, x, w, b=None):
    kernel = list(w.shape[2:])
    begin, sym, end = _pads(a, kernel)
    if not sym:
        flat = []
        for lo, hi in zip(reversed(begin), reversed(end)):
            flat += [lo, hi]
        x, begin = F.pad(x, flat), [0] * len(kernel)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    return conv(x, w, b, stride=a.get("strides", 1), padding=begin, dilation=a.get("dilations", 1),
                groups=a.get("group", 1))


def _pool(kind):
    def run(node, a, x):
        kernel = list(a["kernel_shape"])
        begin, sym, end = _pads(a, kernel)
        if not sym:
            raise UserError(f"node {node.name or node.op_type}: asymmetric pooling pads are not supported")
        if len(kernel) != 2:
            raise UserError(f"node {node.name or node.op_type}: only 2-D pooling is supported by the importer")
        stride = a.get("strides", [1] * len(kernel))
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            return F.max_pool2d(x, kernel, stride, begin, a.get("dilations", 1), ceil_mode=ceil)
        return F.avg_pool2d(x, kernel, stride, begin, ceil_mode=ceil,
                            count_include_pad=bool(a.get("count_include_pad", 0)))
    return run


def _gemm(node, a, x, w, c=None):
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = a.get("alpha", 1.0) * (x @ w)
    return y if c is None else y + a.get("beta", 1.0) * c


def _reshape(node, a, x, shape):
    target = _ints(shape)
    if not a.get("allowzero", 0):
        target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
    return x.reshape(target)


def _axes(a, axes_input, default=None):
    if axes_input is not None:
        return _ints(axes_input)
    return list(a["axes"]) if "axes" in a else default


def _squeeze(node, a, x, axes=None):
    ax = _axes(a, axes)
    if ax is None:
        return x.squeeze()
    for d in sorted((d % x.dim() for d in ax), reverse=True):
        x = x.squeeze(d)
    return x


def _unsqueeze(node, a, x, axes=None):
    ax = _axes(a, axes)
    out_rank = x.dim() + len(ax)
    for d in sorted(d % out_rank for d in ax):
        x = x.unsqueeze(d)
    return x


def _slice(node, a, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise UserError(f"node {node.name}: Slice with a negative step is not supported by the importer")
        n = x.shape[ax]
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        index[ax] = slice(s, e, st)
    return x[tuple(index)]


def _reduce(fn):
    def run(node, a, x, axes=None):
        ax = _axes(a, axes)
        keep = bool(a.get("keepdims", 1))
        if ax is None or len(ax) == 0:
            if a.get("noop_with_empty_axes", 0):
                return x
            ax = list(range(x.dim()))
        return fn(x, dim=ax, keepdim=keep)
    return run


def _layer_norm(node, a, x, scale, bias=None):
    axis = a.get("axis", -1) % x.dim()
    shape = list(x.shape[axis:])
    return F.layer_norm(x, shape, scale.expand(shape), None if bias is None else bias.expand(shape),
                        eps=a.get("epsilon", 1e-5))


def _split(node, a, x, split=None):
    axis = a.get("axis", 0)
    sizes = _ints(split) if split is not None else list(a.get("split", []))
    if not sizes:   # equal chunks, the last one smaller when the axis does not divide
        return tuple(torch.split(x, math.ceil(x.shape[axis] / len(node.output)), dim=axis))
    return tuple(torch.split(x, sizes, dim=axis))


def _gather(node, a, x, idx):
    axis = a.get("axis", 0) % x.dim()
    flat = idx.long().reshape(-1)
    flat = torch.where(flat < 0, flat + x.shape[axis], flat)
    out = torch.index_select(x, axis, flat)
    return out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))


def _flatten(node, a, x):
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _bn(node, a, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))


_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
           onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
           onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.FLOAT16: torch.float16}


def _cast(node, a, x):
    to = a["to"]
    if to not in _DTYPES:
        raise UserError(f"node {node.name}: Cast to ONNX type {to} is not supported by the importer")
    return x.to(_DTYPES[to])


def _gelu(node, a, x):
    approx = a.get("approximate", b"none")
    return F.gelu(x, approximate=approx.decode() if isinstance(approx, bytes) else approx)


def _binary(fn):
    return lambda node, a, x, y: fn(x, y)


def _unary(fn):
    return lambda node, a, x: fn(x)


OPS = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _binary(torch.matmul),
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "BatchNormalization": _bn, "LayerNormalization": _layer_norm,
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh), "Erf": _unary(torch.erf),
    "Gelu": _gelu, "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Neg": _unary(torch.neg),
    "Reciprocal": _unary(torch.reciprocal), "Identity": _unary(lambda x: x),
    "LeakyRelu": lambda node, a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Clip": lambda node, a, x, lo=None, hi=None: x if lo is None and hi is None else torch.clamp(x, lo, hi),
    "HardSigmoid": lambda node, a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1),
    "HardSwish": _unary(F.hardswish),
    "Softmax": lambda node, a, x: torch.softmax(x, dim=a.get("axis", -1)),
    "LogSoftmax": lambda node, a, x: torch.log_softmax(x, dim=a.get("axis", -1)),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _binary(torch.div),
    "Pow": _binary(torch.pow), "Max": lambda node, a, *xs: torch.stack(torch.broadcast_tensors(*xs)).amax(0),
    "Min": lambda node, a, *xs: torch.stack(torch.broadcast_tensors(*xs)).amin(0),
    "Equal": _binary(torch.eq), "Where": lambda node, a, c, x, y: torch.where(c.bool(), x, y),
    "Reshape": _reshape, "Flatten": _flatten,
    "Transpose": lambda node, a, x: x.permute(a["perm"] if "perm" in a else list(reversed(range(x.dim())))),
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Slice": _slice, "Gather": _gather, "Split": _split,
    "Concat": lambda node, a, *xs: torch.cat(xs, dim=a["axis"]),
    "Expand": lambda node, a, x, shape: x * torch.ones(_ints(shape), dtype=x.dtype),
    "Shape": lambda node, a, x: torch.tensor(list(x.shape)[a.get("start", 0):a.get("end", None)], dtype=torch.int64),
    "Cast": _cast, "CastLike": lambda node, a, x, like: x.to(like.dtype), "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
}


def _constant(node: onnx.NodeProto) -> torch.Tensor:
    a = node.attribute[0]
    if a.name == "value":
        return torch.from_numpy(numpy_helper.to_array(a.t).copy())
    v = onnx.helper.get_attribute_value(a)
    dtype = {"value_float": torch.float32, "value_floats": torch.float32,
             "value_int": torch.int64, "value_ints": torch.int64}.get(a.name)
    if dtype is None:
        raise UserError(f"node {node.name}: Constant with {a.name} is not supported by the importer")
    return torch.tensor(v, dtype=dtype)


def parameter_key(name: str) -> str:
    """ONNX initializer names may contain '.', which nn.ParameterDict keys may not."""
    return name.replace(".", "__dot__")


class OnnxModule(nn.Module):
    """The graph as a torch module: ``forward(x)`` returns the first graph output (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, source: str = "artifact"):
        super().__init__()
        g = model.graph
        self.source = source
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < MIN_OPSET:
            raise UserError(f"{source}: ONNX opset {opset}; the attack importer follows opset {MIN_OPSET} and later "
                            f"(Softmax, Clip, Slice and Split changed meaning before it); re-export the model")
        initializer_names = {t.name for t in g.initializer}
        self.input_name = next(i.name for i in g.input if i.name not in initializer_names)
        self.output_name = g.output[0].name
        self.params = nn.ParameterDict()
        self.names: dict[str, str] = {}            # parameter key -> ONNX initializer name
        self.fixed: dict[str, torch.Tensor] = {}   # integer initializers and Constant outputs
        for t in g.initializer:
            a = numpy_helper.to_array(t)
            if np.issubdtype(a.dtype, np.floating) and a.ndim > 0:   # scalars (eps, temperature) stay fixed
                key = parameter_key(t.name)
                self.params[key] = nn.Parameter(torch.from_numpy(a.astype(np.float32, copy=True)))
                self.names[key] = t.name
            else:
                self.fixed[t.name] = torch.from_numpy(a.copy())
        self.nodes = []
        for n in g.node:
            if n.domain not in ("", "ai.onnx"):
                raise UserError(f"{source}: node {n.name!r} uses the custom op domain {n.domain!r}; "
                                f"the attack importer runs standard ONNX ops only")
            if n.op_type == "Constant":
                self.fixed[n.output[0]] = _constant(n)
            elif n.op_type not in OPS:
                raise UserError(f"{source}: op {n.op_type} (node {n.name!r}) is not supported by the attack importer; "
                                f"supported: {', '.join(sorted(OPS))}")
            else:
                self.nodes.append((n, _attrs(n)))
        # BatchNormalization running statistics are not trained by gradient (an unfolded original model has them)
        by_name = {v: k for k, v in self.names.items()}
        self.statistics = {by_name[n.input[i]] for n, _ in self.nodes if n.op_type == "BatchNormalization"
                           for i in (3, 4) if len(n.input) > i and n.input[i] in by_name}
        for k in self.statistics:
            self.params[k].requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = dict(self.fixed)
        for key, p in self.params.items():
            env[self.names[key]] = p
        env[self.input_name] = x
        for node, a in self.nodes:
            try:
                args = [env[i] if i else None for i in node.input]
                while args and args[-1] is None:
                    args.pop()
                out = OPS[node.op_type](node, a, *args)
            except UserError:
                raise
            except KeyError as e:
                raise UserError(f"{self.source}: node {node.name!r} ({node.op_type}) reads {e.args[0]!r} before any "
                                f"node computes it; the graph is not topologically sorted") from None
            except Exception as e:
                raise UserError(f"{self.source}: node {node.name!r} ({node.op_type}) cannot run in the attack importer "
                                f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
            if isinstance(out, tuple):
                env.update(zip(node.output, out))
            else:
                env[node.output[0]] = out
        return env[self.output_name]

    def parameter_roles(self) -> dict[str, tuple[str, int | None]]:
        """key -> (role, fan_in): "weight" of a Conv/Gemm/MatMul (with its fan-in), "scale" of a normalisation,
        "variance" (BatchNormalization statistics), or "other"."""
        by_name = {v: k for k, v in self.names.items()}
        roles: dict[str, tuple[str, int | None]] = {}
        for node, a in self.nodes:
            ins = list(node.input)
            key = lambda i: by_name.get(ins[i]) if len(ins) > i else None
            if node.op_type in ("Conv", "Gemm", "MatMul"):
                for i in ((1,) if node.op_type != "MatMul" else (0, 1)):
                    k = key(i)
                    if k is None or self.params[k].dim() < 2:
                        continue
                    shape = list(self.params[k].shape)
                    if node.op_type == "Conv":
                        fan_in = int(np.prod(shape[1:]))
                    elif node.op_type == "Gemm":
                        fan_in = shape[1] if a.get("transB", 0) else shape[0]
                    else:
                        fan_in = shape[-2] if i == 1 else shape[-1]
                    roles[k] = ("weight", fan_in)
            elif node.op_type in ("LayerNormalization", "BatchNormalization"):
                if key(1) is not None:
                    roles[key(1)] = ("scale", None)
                if node.op_type == "BatchNormalization" and key(4) is not None:
                    roles[key(4)] = ("variance", None)
        return roles

    def head_keys(self) -> list[str]:
        """Parameters of the last node that reads any (the classifier head SHOT-style adaptation keeps fixed)."""
        by_name = {v: k for k, v in self.names.items()}
        reads = [[by_name[i] for i in node.input if i in by_name] for node, _ in self.nodes]
        last = max((i for i, keys in enumerate(reads) if any(self.params[k].dim() >= 2 for k in keys)), default=None)
        if last is None:
            return []
        # a MatMul head has its bias in a following Add: everything read from the last weight on is the head
        return [k for keys in reads[last:] for k in keys]


def import_onnx(model: onnx.ModelProto, source: str = "artifact") -> OnnxModule:
    return OnnxModule(model, source).eval()


def write_back(model: onnx.ModelProto, module: OnnxModule) -> onnx.ModelProto:
    """A copy of ``model`` whose floating initializers hold ``module``'s current parameters."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    values = {module.names[k]: p.detach().cpu().numpy() for k, p in module.params.items()}
    for t in out.graph.initializer:
        if t.name in values:
            a = values[t.name].astype(numpy_helper.to_array(t).dtype)
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    return out

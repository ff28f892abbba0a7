"""The default pass pipeline on exported torch models: the artifact equals the masked torch model.

Architectures cover residual Add, Concat, depthwise and grouped Conv, Linear after Flatten,
a weight shared by two layers, bias present and absent, and every channel of a layer masked.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

import passes
from mapc.export import export_onnx
from mapc.masking import masked_forward


class ResidualConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)          # depthwise
        self.gc = nn.Conv2d(16, 8, 1, groups=2, bias=False)       # grouped, after Concat
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        y = y + self.b(y)                                          # residual Add
        z = torch.cat([y, self.dw(y)], 1)                          # Concat
        z = nn.functional.max_pool2d(torch.relu(self.gc(z)), 2)
        return self.fc(z.flatten(1))                               # Linear after Flatten


class SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.l1 = nn.Linear(4, 4, bias=False)
        self.l2 = self.l1                                          # one weight, two uses
        self.out = nn.Linear(4, 10)

    def forward(self, x):
        h = self.conv(x).mean(dim=(2, 3))
        return self.out(torch.relu(self.l2(torch.relu(self.l1(h)))))


class Stem(nn.Module):
    """Conv-BN-ReLU-pool-Flatten-Linear: channels of conv2 can be stripped into the Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = nn.functional.max_pool2d(torch.relu(self.bn2(self.c2(y))), 2)
        return self.fc(torch.flatten(y, 1))


def randomize_bn(m: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
    return m.eval()


def make_masks(m: nn.Module, kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    seen = set()
    for n, p in m.named_parameters():
        if not n.endswith("weight") or p.ndim < 2 or id(p) in seen:
            continue
        seen.add(id(p))
        if kind == "weight":
            mask = (rng.random(p.shape) > 0.4)
        elif kind == "channel":
            keep = rng.random(p.shape[0]) > 0.4
            mask = np.broadcast_to(keep.reshape(-1, *([1] * (p.ndim - 1))), p.shape)
        else:  # "all": every channel of the first layer masked
            mask = np.zeros(p.shape, bool) if not out else np.ones(p.shape, bool)
        out[n] = mask.astype(np.uint8).copy()
    return out


def compile_and_compare(module: nn.Module, masks, shape=(3, 16, 16), fmt="export"):
    params = dict(module.named_parameters())
    originals = {n: params[n].detach().numpy().copy() for n in masks}
    onx, _ = export_onnx(module, fmt, shape)
    out, records = passes.run_pipeline(onx, passes.default_pipeline(masks, originals, {"mode": "test"}))
    x = np.random.default_rng(1).standard_normal((5, *shape)).astype(np.float32)
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    ref = masked_forward(module, masks, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert not [n for n in out.graph.node if n.op_type in ("Mul", "BatchNormalization")]
    return out, {r.name: r for r in records}


@pytest.mark.parametrize("kind", ["weight", "channel", "all"])
@pytest.mark.parametrize("factory", [ResidualConcat, SharedLinear, Stem])
def test_pipeline_matches_masked_torch(factory, kind):
    torch.manual_seed(0)
    m = randomize_bn(factory())
    compile_and_compare(m, make_masks(m, kind), shape=(3, 8, 8))


def test_shared_weight_is_masked_once_and_shipped_once():
    torch.manual_seed(0)
    m = SharedLinear().eval()
    masks = make_masks(m, "weight")
    assert "l1.weight" in masks and "l2.weight" not in masks
    out, records = compile_and_compare(m, masks, shape=(3, 8, 8))
    weights = [numpy_helper.to_array(t) for t in out.graph.initializer if tuple(t.dims) == (4, 4)]
    assert len(weights) == 1


def test_channel_masks_shrink_the_artifact():
    torch.manual_seed(0)
    m = randomize_bn(Stem())
    masks = make_masks(m, "channel", seed=3)
    keep = np.arange(16) % 2 == 0                       # 8 of 16 channels dead: the kept count stays aligned
    masks["c2.weight"] = np.broadcast_to(keep.reshape(-1, 1, 1, 1), (16, 6, 3, 3)).astype(np.uint8).copy()
    out, records = compile_and_compare(m, masks, shape=(3, 8, 8))
    strip = records["strip_dead_channels"]
    assert strip.changed and strip.initializer_bytes_after < strip.initializer_bytes_before
    assert strip.details["channels_removed"]["c2.weight"] == 8


@pytest.mark.parametrize("fmt", ["torchscript"])
def test_pipeline_on_torchscript_export(fmt):
    torch.manual_seed(0)
    m = randomize_bn(Stem())
    masks = make_masks(m, "weight")
    compile_and_compare(torch.jit.script(m), masks, shape=(3, 8, 8), fmt=fmt)


def stem_with_masks():
    """A Stem with trained-looking BN statistics, per-weight masks and the original weights."""
    torch.manual_seed(0)
    m = randomize_bn(Stem())
    masks = make_masks(m, "weight", seed=5)
    params = dict(m.named_parameters())
    return m, masks, {n: params[n].detach().numpy().copy() for n in masks}


def test_fold_masks_finds_weights_the_exporter_folded_batchnorm_into():
    """The exporter's own optimizer folds BN into Conv (W*s per channel): masks still land, exactly."""
    import warnings
    m, masks, originals = stem_with_masks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onx = torch.onnx.export(m, (torch.zeros(2, 3, 8, 8),), dynamo=True, optimize=True, external_data=False,
                                input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},)).model_proto
    assert not [n for n in onx.graph.node if n.op_type == "BatchNormalization"]   # really folded
    for t in onx.graph.initializer:                  # and renamed, as the TorchScript exporter does
        if t.name == "c2.weight":
            t.name = "onnx::Conv_99"
    for node in onx.graph.node:
        for i, name in enumerate(node.input):
            if name == "c2.weight":
                node.input[i] = "onnx::Conv_99"
    out, records = passes.run_pipeline(onx, passes.default_pipeline(masks, originals, {"mode": "test"}))
    x = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], masked_forward(m, masks, x), rtol=1e-4, atol=1e-5)
    assert records[0].details["masks"]["c2.weight"]["initializers"] == ["onnx::Conv_99"]


def test_audit_catches_a_rescaled_unmasked_copy():
    m, masks, originals = stem_with_masks()
    onx, _ = export_onnx(m, "export", (3, 8, 8))
    out, _ = passes.run_pipeline(onx, passes.default_pipeline(masks, originals, {"mode": "test"}))
    leaked = originals["c2.weight"] * np.linspace(0.5, 2.0, 16, dtype=np.float32).reshape(-1, 1, 1, 1)
    out.graph.initializer.append(numpy_helper.from_array(leaked, "spare"))
    with pytest.raises(passes.PassError, match="rescaling of the unmasked original"):
        passes.Audit(masks, originals)(out)


def test_square_linear_weights_exported_transposed_are_folded_and_audited():
    """A square Linear (attention projections) is stored transposed after constant folding: same shape as its
    mask, other orientation. fold_masks must mask it and the audit must find it."""
    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)                    # (N, 16, 8): 3-D input -> MatMul
            return self.head(torch.relu(self.q(tokens)).mean(1))

    torch.manual_seed(0)
    m = Square().eval()
    mask = (torch.rand(8, 8) > 0.5).numpy().astype(np.uint8)
    mask[0, 1], mask[1, 0] = 0, 1                                      # asymmetric: orientation matters
    compile_and_compare(m, {"q.weight": mask}, shape=(8, 4, 4))

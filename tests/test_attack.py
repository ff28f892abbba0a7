"""`mapc attack` and its ONNX importer: parity with onnxruntime, each attack on a toy case it can improve, gates,
reports and bad input."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from mapc.attack import AttackRequest, AttackSettings, attack
from mapc.cli import main
from mapc.errors import UserError
from mapc.export import export_onnx
from mapc.onnx_import import import_onnx, write_back
from mapc.preprocess import Preprocess, apply
from tests.conftest import DIGITS, ROOT, subset
from tests.tiny_models import plain

PRE = Preprocess(size=(16, 16), channels=3)
PRE_FLAGS = ["--input-size", "16", "16", "--channels", "3"]


def ort_logits(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    data = model if isinstance(model, str) else model.SerializeToString()
    s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def torch_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return import_onnx(model)(torch.from_numpy(x)).numpy()


def test_importer_reproduces_onnxruntime_on_tiny_models_and_artifacts(tiny_models, artifact):
    from mapc.models import load_model
    x = np.random.default_rng(0).normal(size=(32, 3, 16, 16)).astype(np.float32)
    graphs = {"artifact": onnx.load(str(artifact))}
    for name, files in tiny_models.items():
        for fmt in ("export", "torchscript"):
            loaded = load_model(files[fmt])
            graphs[f"{name}/{fmt}"], _ = export_onnx(loaded.module, loaded.format, (3, 16, 16))
    for name, g in graphs.items():
        diff = np.abs(ort_logits(g, x) - torch_logits(g, x)).max()
        assert diff < 1e-4, (name, diff)


@pytest.mark.parametrize("sample", ["digits_cnn", "digits_vit"])
def test_importer_reproduces_the_sample_models(sample):
    """Convolutional (Conv, BatchNormalization, Gemm) and transformer (MatMul, LayerNormalization, Softmax, Gelu) ops."""
    from mapc.models import load_model
    loaded = load_model(ROOT / "samples" / "models" / f"{sample}.pt2")
    g, _ = export_onnx(loaded.module, loaded.format, (3, 32, 32))
    x = np.random.default_rng(1).normal(size=(16, 3, 32, 32)).astype(np.float32)
    assert np.abs(ort_logits(g, x) - torch_logits(g, x)).max() < 1e-4
    net = import_onnx(g)
    head = net.head_keys()
    assert head and all(net.params[k].shape[0] == 10 or net.params[k].shape[-1] == 10 for k in head)


def test_write_back_carries_trained_weights_under_their_onnx_names(artifact):
    g = onnx.load(str(artifact))
    net = import_onnx(g)
    with torch.no_grad():
        for p in net.params.values():
            p.mul_(0.5)
    x = np.random.default_rng(2).normal(size=(8, 3, 16, 16)).astype(np.float32)
    changed = write_back(g, net)
    assert [t.name for t in changed.graph.initializer] == [t.name for t in g.graph.initializer]
    with torch.no_grad():
        assert np.abs(ort_logits(changed, x) - net(torch.from_numpy(x)).numpy()).max() < 1e-4


def test_an_unsupported_op_is_named():
    from onnx import TensorProto, helper
    node = helper.make_node("Mod", ["x", "x"], ["y"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    with pytest.raises(UserError, match="op Mod"):
        import_onnx(helper.make_model(g))


# ---------------------------------------------------------------- each attack improves where it can

@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    """A tiny CNN trained on 256 mnist rows, degraded copies of it, and domains each attack can recover:
    a relabelled copy of mnist, inverted mnist (a pixel map undoes it), dimmed mnist (a shift self-training
    narrows)."""
    d = tmp_path_factory.mktemp("toy")
    mnist = subset(DIGITS / "mnist.npz", d / "mnist.npz", 256, 128)
    z = dict(np.load(mnist))
    np.savez(d / "copy.npz", **z)
    np.savez(d / "inverted.npz", **(z | {"images": 255 - z["images"]}))
    np.savez(d / "dim.npz", **(z | {"images": (z["images"] * 0.4).astype(np.uint8)}))
    train = z["split"] == "train"
    x, y = torch.from_numpy(apply(PRE, z["images"][train])), torch.from_numpy(z["labels"][train]).long()
    torch.manual_seed(0)
    good = plain().train()
    opt = torch.optim.Adam(good.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        i = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(good(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    good.eval()
    permuted, broken = copy.deepcopy(good), copy.deepcopy(good)
    order = torch.tensor([3, 7, 1, 9, 0, 2, 8, 4, 6, 5])
    with torch.no_grad():
        permuted.fc2.weight.copy_(good.fc2.weight[order])
        permuted.fc2.bias.copy_(good.fc2.bias[order])
        broken.fc1.weight.zero_()
        broken.fc1.bias.add_(torch.randn(24, generator=g))
    out = {n: d / f"{n}.npz" for n in ("mnist", "copy", "inverted", "dim")}
    for name, m in (("good", good), ("permuted", permuted), ("broken", broken)):
        onnx.save(export_onnx(m, "export", (3, 16, 16))[0], d / f"{name}.onnx")
        out[name] = d / f"{name}.onnx"
    return out


def run_one(toy, model, attack_name, domain, authorized=False):
    req = AttackRequest(str(toy[model]), {"mnist": str(toy["mnist"])} if authorized else {},
                        {domain: str(toy[domain])}, attacks=(attack_name,), budgets=(0.5,), preprocess=PRE,
                        settings=AttackSettings(steps=100))
    rows = attack(req, progress=False)["attacks"]
    assert len(rows) == 1 and rows[0]["attack"] == attack_name
    return rows[0]


@pytest.mark.parametrize("case", [
    ("remap", "permuted", "copy", False, 40),             # outputs moved to other classes: relabelling reads them
    ("target-finetune", "broken", "copy", False, 25),     # a zeroed layer relearned from labelled rows
    ("source-finetune", "broken", "copy", True, 25),      # relearned from authorized rows, measured elsewhere
    ("input-disguise", "good", "inverted", False, 40),    # frozen weights; the transform learns to invert
    ("self-training", "good", "dim", False, 10),          # unlabelled dim rows: confident, diverse predictions
])
def test_each_attack_recovers_accuracy_where_it_can(toy, case):
    name, model, domain, authorized, min_gain = case
    row = run_one(toy, model, name, domain, authorized)
    a = row["artifact"]
    assert a["after"] >= a["before"] + min_gain, row
    if name == "target-finetune":
        assert row["scratch"] is not None and row["gain"] == pytest.approx(a["after"] - row["scratch"])


def test_attack_is_deterministic_for_a_seed(toy):
    a = run_one(toy, "broken", "target-finetune", "copy")
    b = run_one(toy, "broken", "target-finetune", "copy")
    assert a["artifact"]["after"] == b["artifact"]["after"] and a["scratch"] == b["scratch"]


# ---------------------------------------------------------------- the command

def cli(*args):
    return CliRunner().invoke(main, ["attack", *map(str, args)])


def test_command_prints_table_and_verdict_and_writes_reports(tmp_path, toy):
    report = tmp_path / "r" / "attack.json"
    r = cli(toy["good"], "--authorized", f"mnist={toy['mnist']}", "--unauthorized", f"inv={toy['inverted']}",
            "--baseline", toy["good"], "--steps", "20", "--budget", "0.05", "--budget", "0.2", *PRE_FLAGS,
            "--report", report, "-q")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("PASSED") and "no gates requested" in lines[-1]
    assert any(line.startswith("target-finetune") for line in lines)
    data = json.loads(report.read_text())
    assert data["command"] == "attack" and data["verdict"] == lines[-1]
    assert {row["attack"] for row in data["attacks"]} == {"remap", "target-finetune", "source-finetune",
                                                          "input-disguise", "self-training"}
    assert {row["budget"] for row in data["attacks"]} == {"5%", "20%"}
    assert all("original" in row for row in data["attacks"])
    assert all(isinstance(row.get("scratch"), float) for row in data["attacks"] if row["attack"].endswith("finetune"))
    assert data["importer"]["artifact"]["max_abs_logit_diff"] < 1e-4
    assert "scratch" in [h.strip() for h in report.with_suffix(".md").read_text().split("## Attacks")[1]
                         .splitlines()[2].split("|")]
    html = report.with_suffix(".html").read_text()
    assert "alt='attacks vs budget' src='data:image/png;base64," in html


def test_gates_fail_with_exit_1_and_fail_closed(toy):
    base = [toy["good"], "--unauthorized", f"inv={toy['inverted']}", "--steps", "20", *PRE_FLAGS, "-q"]
    r = cli(*base, "--attack", "input-disguise", "--max-attacked-acc", "5")
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines()[-1].startswith("FAILED | max_attacked_acc[inv]=")
    r = cli(*base, "--attack", "input-disguise", "--max-attacked-acc", "99")
    assert r.exit_code == 0, r.output
    r = cli(*base, "--attack", "remap", "--max-finetune-gain", "50")   # target-finetune did not run
    assert r.exit_code == 1 and "not measured" in r.output


def test_attacked_accuracy_is_never_below_the_artifact_as_shipped(toy):
    """An attack that does worse than the shipped artifact does not lower the gated figure (the holder just
    uses the artifact as it is)."""
    base = [toy["good"], "--unauthorized", f"dim={toy['dim']}", "--attack", "remap", "--budget", "0.05", *PRE_FLAGS]
    r = cli(*base, "--json", "-q")
    report = json.loads(r.output.splitlines()[0])
    w = report["worst"]["dim"]
    assert w["attacked_acc"] >= w["before"]
    r = cli(*base, "--max-attacked-acc", f"{w['before'] - 1:.1f}", "-q")
    assert r.exit_code == 1, r.output


def test_a_diverged_attack_leaves_the_gate_unmeasured_and_failing():
    from mapc.attack import AttackGates, evaluate_attack_gates, worst_cases
    rows = [{"attack": "input-disguise", "budget": "1%", "domain": "u", "artifact": {"before": 10.0, "after": None}},
            {"attack": "target-finetune", "budget": "1%", "domain": "u", "artifact": {"before": 10.0, "after": None},
             "scratch": None, "gain": None}]
    worst = worst_cases(rows, {"u": 10.0})
    assert "attacked_acc" not in worst["u"] and worst["u"]["diverged"]
    gates = evaluate_attack_gates(AttackGates(max_attacked_acc=50, max_finetune_gain=5), worst)
    assert [g["passed"] for g in gates] == [False, False] and all(g["value"] is None for g in gates)


@pytest.mark.parametrize("args,message", [
    (["missing.onnx", "--unauthorized", "x={inv}"], "no such artifact"),
    (["{good}"], "--unauthorized"),
    (["{good}", "--unauthorized", "x={inv}", "--attack", "jailbreak"], "not an attack"),
    (["{good}", "--unauthorized", "x={inv}", "--budget", "0"], "--budget"),
    (["{good}", "--unauthorized", "x={inv}", "--budget", "1.5"], "--budget"),
    (["{good}", "--unauthorized", "x={inv}", "--budget", "nan"], "--budget"),
    (["{good}", "--unauthorized", "x={inv}", "--max-attacked-acc", "200"], "--max-attacked-acc"),
    (["{good}", "--unauthorized", "x={inv}", "--report", "out.txt"], ".json"),
    (["{good}", "--unauthorized", "x={inv}", "--attack", "source-finetune"], "--authorized"),
    (["{good}", "--unauthorized", "x={inv}", "--authorized", "x={mnist}"], "both authorized and unauthorized"),
    (["{good}", "--unauthorized", "x={nosplit}"], "split"),
    (["{good}", "--unauthorized", "x={inv}", "--baseline", "{garbage}"], "baseline"),
    (["{garbage}", "--unauthorized", "x={inv}"], "not a readable ONNX model"),
    (["{good}", "--unauthorized", "x={inv}", "--seed", "-1"], "--seed"),
    (["{good}", "--unauthorized", "x={inv}", "--budget", "0.01", "--budget", "0.0100000001"], "twice"),
    (["{good}", "--unauthorized", "x={inv}", "--baseline", "{five}"], "compiled from"),
    (["{two_inputs}", "--unauthorized", "x={inv}"], "one input"),
    (["{unsorted}", "--unauthorized", "x={inv}"], "topologically sorted"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, toy, args, message):
    z = dict(np.load(toy["mnist"]))
    np.savez(tmp_path / "nosplit.npz", images=z["images"], labels=z["labels"])
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    from onnx import TensorProto, helper
    from tests.tiny_models import PlainNet
    onnx.save(export_onnx(PlainNet(num_classes=5).eval(), "export", (3, 16, 16))[0], tmp_path / "five.onnx")
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 16, 16])
    z_info = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 768])
    g = helper.make_graph([helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("Flatten", ["s"], ["z"])],
                          "two", [x_info, y_info], [z_info])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "two_inputs.onnx")
    good = onnx.load(str(toy["good"]))
    nodes = list(good.graph.node)
    del good.graph.node[:]
    good.graph.node.extend(nodes[::-1])
    onnx.save(good, tmp_path / "unsorted.onnx")
    paths = {k: str(v) for k, v in toy.items()} | {n: str(tmp_path / f"{n}.onnx") for n in
                                                   ("five", "two_inputs", "unsorted")} | {
                                                   "nosplit": str(tmp_path / "nosplit.npz"),
                                                   "garbage": str(tmp_path / "garbage.onnx"), "inv": str(toy["inverted"])}
    r = CliRunner().invoke(main, ["attack", *[a.format(**paths) for a in args], *PRE_FLAGS, "--steps", "2", "-q"])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.startswith("mapc: error")]) == 1

"""Source-free and data-free modes: synthesis quality (measured), end-to-end runs, CLI errors."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mapc.cli import main
from mapc.errors import UserError
from mapc.models import load_model
from mapc.rows import ArrayRows
from mapc.synthesis import (INSIDE_FRACTION, NEIGHBOR_KINDS, NEIGHBOR_VARIANTS, BNProbe, NeighborRows, SynthesisConfig,
                            chroma, invert, neighbor_domains, separability)
from tests.conftest import ROOT
from tests.tiny_models import plain, residual

HALF = ((0.5,) * 3, (0.5,) * 3)     # the preprocessing mean/std the tests use
CPU = torch.device("cpu")


def calibrated_residual() -> torch.nn.Module:
    """The tiny residual net with BatchNorm statistics of valid images (smooth blobs in [0, 1], normalised),
    as training would leave them; the fixture's statistics are arbitrary and out of any image's reach."""
    m = residual()
    for bn in (m.bn, m.bn2):
        bn.reset_running_stats()
        bn.momentum = None            # cumulative average
    g = torch.Generator().manual_seed(3)
    m.train()
    with torch.no_grad():
        for _ in range(8):
            blobs = torch.nn.functional.interpolate(torch.rand(64, 1, 4, 4, generator=g), size=(16, 16),
                                                    mode="bilinear", align_corners=False)
            m((blobs.expand(-1, 3, -1, -1) - 0.5) / 0.5)
    return m.eval()


@pytest.mark.parametrize("fmt,method", [("export", "pixels"), ("state_dict", "pixels"), ("module", "generator")])
def test_synthesized_batches_match_bn_statistics_far_better_than_noise(tiny_models, fmt, method):
    if fmt == "module":
        m = type("Loaded", (), {"module": calibrated_residual(), "format": "state_dict"})
    else:
        m = load_model(tiny_models["residual"][fmt], arch="tests.tiny_models:residual")
    before = {k: v.clone() for k, v in m.module.state_dict().items()}
    cfg = SynthesisConfig(method=method, images=64, batch=64, steps=300 if method == "generator" else 60,
                          tv_weight=0.05)
    x, y, stats = invert(m.module, m.format, (3, 16, 16), 10, cfg, 0, CPU, *HALF, progress=False)
    assert x.shape == (64, 3, 16, 16) and set(y.tolist()) == set(range(10)) and stats["method"] == method
    if method == "generator":     # sigmoid output: always valid pixels, (0, 1) -> (-1, 1) normalised
        assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
    assert stats["bn_mismatch_synthetic"] < 0.75 * stats["bn_mismatch_noise"], stats
    for k, v in m.module.state_dict().items():
        assert torch.equal(v, before[k]), f"synthesis changed {k}"
    if fmt == "export":  # the caller's graph is not left instrumented
        assert not any("record" in str(n.target) for n in m.module.graph.nodes)


def test_sample_model_synthesis_beats_noise_on_bn_statistics():
    m = load_model(ROOT / "samples/models/digits_plain.pt2")
    cfg = SynthesisConfig(method="pixels", images=64, batch=64, steps=100)
    x, y, stats = invert(m.module, m.format, (3, 32, 32), 10, cfg, 0, CPU, *HALF, progress=False)
    assert stats["bn_mismatch_synthetic"] < 0.2 * stats["bn_mismatch_noise"], stats
    with torch.no_grad():
        agree = (m.module(x).argmax(1) == y).float().mean().item()
    assert agree > 0.9   # the frozen model reads the intended classes
    plain_cfg = SynthesisConfig(method="pixels", images=64, batch=64, steps=100, chroma_weight=0.0)
    x0, _, _ = invert(m.module, m.format, (3, 32, 32), 10, plain_cfg, 0, CPU, *HALF, progress=False)
    assert chroma(x) < 0.7 * chroma(x0)       # the colour prior: greyer images (measured 0.55x at seed 0)


class Standardised(torch.nn.Module):
    """A random PlainNet whose logits are standardised per class on a calibration batch, so that its
    argmax spreads over the classes (a random net's argmax is mostly one class)."""

    def __init__(self, seed: int, calibration: torch.Tensor):
        super().__init__()
        from tests.tiny_models import PlainNet
        torch.manual_seed(seed)
        self.net = PlainNet().eval()
        with torch.no_grad():
            z = self.net(calibration)
        self.register_buffer("mean", z.mean(0))
        self.register_buffer("std", z.std(0))

    def forward(self, x):
        return (self.net(x) - self.mean) / self.std


def test_student_fidelity_separates_informative_from_uninformative_images():
    """A fresh student distilled on images from the real rows' distribution agrees with the teacher on
    the real rows; one distilled on a single image repeated does not."""
    from mapc.fidelity import student_fidelity
    from tests.tiny_models import PlainNet
    g = torch.Generator().manual_seed(0)

    def blobs(n):   # smooth images: a low-dimensional input distribution a small student can learn on
        return 2 * torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(16, 16),
                                                   mode="bilinear", align_corners=False) - 1

    teacher = Standardised(5, blobs(1000))
    real_x = blobs(400)
    with torch.no_grad():
        real_y = teacher(real_x).argmax(1)
    assert torch.bincount(real_y, minlength=10).max() < 200          # not one dominant class
    informative, single = blobs(2000), blobs(1).expand(2000, -1, -1, -1).contiguous()
    good = student_fidelity(PlainNet, teacher, informative, real_x, real_y, steps=600, seed=0)
    bad = student_fidelity(PlainNet, teacher, single, real_x, real_y, steps=600, seed=0)
    assert good.teacher_acc == 100.0 and good.images == 2000 and good.seconds > 0
    assert good.student_acc > bad.student_acc + 20, (good, bad)


def test_separability_flags_a_domain_inside_the_training_statistics():
    """A domain optimised to the model's BatchNorm statistics (as close as training data) is not separable;
    a far-off domain (loud noise) is."""
    m = calibrated_residual()
    weak = SynthesisConfig(method="pixels", images=64, batch=64, steps=10, tv_weight=0.05)
    strong = SynthesisConfig(method="pixels", images=64, batch=64, steps=200, tv_weight=0.05)
    _, _, stats = invert(m, "state_dict", (3, 16, 16), 10, weak, 0, CPU, *HALF, progress=False)
    inside, _, _ = invert(m, "state_dict", (3, 16, 16), 10, strong, 1, CPU, *HALF, progress=False)
    noise = 3 * torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out = separability(m, "state_dict", {"inside": inside, "noise": noise}, stats)
    assert out["inside"]["separable"] is False and out["noise"]["separable"] is True, out
    assert out["inside"]["of_noise"] < INSIDE_FRACTION < out["noise"]["of_noise"]
    assert out["inside"]["bn_mismatch_synthetic"] == out["noise"]["bn_mismatch_synthetic"] > 0


def test_models_without_batchnorm_or_torchscript_are_refused(tiny_models):
    with pytest.raises(UserError, match="BatchNorm"):
        BNProbe(plain(), "state_dict")
    ts = load_model(tiny_models["residual"]["torchscript"])
    with pytest.raises(UserError, match="TorchScript"):
        BNProbe(ts.module, ts.format)


def test_neighbor_domains_keep_shape_and_differ():
    x = (torch.rand(8, 3, 16, 16) - 0.5) * 1.5
    base = ArrayRows(x.numpy(), np.arange(8) % 3)
    train, val = neighbor_domains(base, base, 0, 0.1, 0.5, *HALF)
    assert len(train) == len(val) == len(NEIGHBOR_KINDS)
    for t, v in zip(train, val):
        assert len(t) == 8 * NEIGHBOR_VARIANTS and len(v) == 8
        assert (t.labels[:16] == np.tile(base.labels, 2)).all() and (v.labels == base.labels).all()
        rows = t.take(np.array([3, 11, 8 * NEIGHBOR_VARIANTS - 1]))
        assert rows.shape == (3, 3, 16, 16) and rows.dtype == np.float32
        assert not np.allclose(t.take(np.arange(8)), x.numpy())
        assert not np.allclose(t.take(np.arange(8)), t.take(np.arange(8, 16)))   # another draw of each row


def test_neighbor_rows_read_the_same_in_any_batch():
    """A row's shift is a pure function of its index: batches, order and workers cannot change it."""
    x = (torch.rand(6, 3, 16, 16) - 0.5) * 1.5
    for kind in range(len(NEIGHBOR_KINDS)):
        rows = NeighborRows(ArrayRows(x.numpy()), kind, 7, 0.1, 0.5, *HALF)
        idx = np.array([40, 3, 17, 99, 5])
        together = rows.take(idx)
        alone = np.concatenate([rows.take(idx[i:i + 1]) for i in range(len(idx))])
        np.testing.assert_array_equal(together, alone)
        np.testing.assert_array_equal(rows.take(idx[::-1]), together[::-1])
        other_seed = NeighborRows(ArrayRows(x.numpy()), kind, 8, 0.1, 0.5, *HALF)
        assert not np.array_equal(other_seed.take(idx), together)     # strengths (at least) differ


def test_neighbor_strength_blends_toward_the_full_shift():
    """Strength 1 without composition is the full shift; lower strengths lie between image and shift."""
    x = (torch.rand(4, 3, 16, 16) - 0.5) * 1.5
    kind = NEIGHBOR_KINDS.index("inverted")
    full = NeighborRows(ArrayRows(x.numpy()), kind, 0, 1.0, 0.0, *HALF).take(np.arange(4))
    np.testing.assert_allclose(full, -x.clamp(-1, 1).numpy(), atol=1e-6)   # 1 - p in pixels is -x normalised
    part = NeighborRows(ArrayRows(x.numpy()), kind, 0, 0.0, 0.0, *HALF).take(np.arange(4))
    lo, hi = np.minimum(x.clamp(-1, 1).numpy(), full), np.maximum(x.clamp(-1, 1).numpy(), full)
    assert (part >= lo - 1e-6).all() and (part <= hi + 1e-6).all()
    assert not np.allclose(part, full, atol=1e-3) and not np.allclose(part, x.clamp(-1, 1).numpy(), atol=1e-3)
    # each row's own strength: (part - x) / (full - x) is one number per row, in [0, 1], not all the same
    a = [float(np.nanmedian((p - xi) / np.where(np.abs(f - xi) > 1e-3, f - xi, np.nan)))
         for p, xi, f in zip(part, x.clamp(-1, 1).numpy(), full)]
    assert all(0.0 <= v <= 1.0 for v in a) and max(a) - min(a) > 0.05
    # training row N + i is another draw of base row i (here: the same full inversion)
    again = NeighborRows(ArrayRows(x.numpy()), kind, 0, 1.0, 0.0, *HALF).take(np.array([4 + 1, 2 * 4 + 3]))
    np.testing.assert_allclose(again, full[[1, 3]], atol=1e-6)


def test_each_generator_draws_the_images_and_they_differ(monkeypatch):
    import mapc.synthesis as synthesis
    built = []

    class Recorded(synthesis.ConditionalGenerator):
        def __init__(self, *args):
            super().__init__(*args)
            built.append({k: v.clone() for k, v in self.state_dict().items()})

    m = calibrated_residual()
    cfg = SynthesisConfig(method="generator", images=32, batch=32, steps=20)
    monkeypatch.setattr(synthesis, "ConditionalGenerator", Recorded)
    x2, y2, stats = invert(m, "state_dict", (3, 16, 16), 10, replace(cfg, generators=2), 0, CPU, *HALF,
                           progress=False)
    assert len(built) == 2 and not torch.equal(built[0]["project.weight"], built[1]["project.weight"])
    monkeypatch.undo()
    x1, y1, _ = invert(m, "state_dict", (3, 16, 16), 10, replace(cfg, generators=1), 0, CPU, *HALF,
                       progress=False)
    assert x2.shape == (64, 3, 16, 16) and stats["generators"] == 2 and stats["images"] == 64
    # the first generator is the one a single-generator synthesis trains; the second is another one
    assert torch.equal(x2[:32], x1) and torch.equal(y2[:32], y1)
    assert set(y2[32:].tolist()) == set(range(10)) and not torch.allclose(x2[32:], x1, atol=1e-3)


def test_generators_are_validated():
    assert SynthesisConfig().generators == 1 and SynthesisConfig(generators=3).resolved().generators == 3
    with pytest.raises(UserError, match="needs method"):
        SynthesisConfig(method="pixels", generators=2)
    with pytest.raises(UserError, match="positive whole number"):
        SynthesisConfig(generators=0)


def test_neighbor_rows_refuse_inputs_too_large_to_draw_for():
    with pytest.raises(UserError, match="neighbor shifts draw at most"):
        NeighborRows(ArrayRows(np.zeros((1, 3, 2048, 2048), np.float32)), 0, 0, 0.1, 0.5, *HALF)


def test_neighbor_settings_are_validated():
    with pytest.raises(UserError, match="neighbor_min_strength"):
        SynthesisConfig(neighbor_min_strength=1.5)
    with pytest.raises(UserError, match="neighbor_compose"):
        SynthesisConfig(neighbor_compose=-0.1)


def run_cli(args):
    return CliRunner().invoke(main, ["compile", *map(str, args)], catch_exceptions=False)


def sf_args(tiny_models, small_domains, out, mode):
    args = [tiny_models["residual"]["export"], "--mode", mode, "--input-size", "16", "16", "--steps", "30",
            "--max-source-drop", "99", "-o", out, "-q", "--authorized", f"mnist={small_domains['mnist']}"]
    if mode == "source-free":
        args += ["--unauthorized", f"syn={small_domains['syn']}"]
    return args


@pytest.mark.parametrize("mode", ["source-free", "data-free"])
def test_mode_end_to_end_on_tiny_model(tmp_path, tiny_models, small_domains, mode):
    cfg = tmp_path / "fast.toml"
    cfg.write_text("[synthesis]\nimages = 64\nbatch = 64\nsteps = 60\ntv_weight = 0.05\n")
    out = tmp_path / "out"
    r = run_cli(["--config", cfg, *sf_args(tiny_models, small_domains, out, mode)])
    assert r.exit_code == 0, r.output + r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == mode and report["learned_from"]["authorized"] == "synthesized"
    assert report["synthesis"]["bn_mismatch_synthetic"] < report["synthesis"]["bn_mismatch_noise"]
    assert "mnist" in report["domains"]                 # real authorized data measured, not learned from
    assert report["timings"]["synthesis_seconds"] > 0
    assert "synthesized" in (out / "report.html").read_text()
    feas = report["synthesis"]["feasibility"]
    assert set(feas) == ({"syn"} if mode == "source-free" else set())
    assert "## Synthesized authorized data" in (out / "report.md").read_text()
    import onnx
    from passes import read_metadata
    sealed = read_metadata(onnx.load(str(out / "protected.onnx")))
    assert sealed["mapc.learned_from"] == report["learned_from"]
    assert sealed["mapc.learned_from"]["unauthorized"] == ("synthesized neighbor domains" if mode == "data-free"
                                                           else "real train rows")
    assert report["synthesis"]["generators"] == 1 and report["synthesis"]["images"] == 64
    used = report["mask"]["config"]               # the mode's defaults reached the compile; --steps won
    assert used["tie_break"] == "drop" and used["steps"] == 30
    assert used["probe_weight"] == (0.0 if mode == "data-free" else 2.0)
    assert all(("val_unauthorized_probe" in h) == (mode != "data-free")
               for h in report["mask"]["history"] if "val_source_drop" in h)


def test_without_authorized_data_the_source_gate_fails_closed(tmp_path, tiny_models, small_domains):
    """Source-free with no --authorized: nothing measures the authorized domain, so the default
    max_source_drop gate fails (exit 1) instead of being skipped; --no-gates builds without gates."""
    cfg = tmp_path / "fast.toml"
    cfg.write_text("[synthesis]\nimages = 32\nbatch = 32\nsteps = 5\n")
    base = ["--config", cfg, tiny_models["residual"]["export"], "--mode", "source-free", "--input-size", "16", "16",
            "--steps", "30", "-q", "--unauthorized", f"syn={small_domains['syn']}"]
    r = run_cli([*base, "-o", tmp_path / "gated"])
    assert r.exit_code == 1, r.output + r.stderr
    assert "max_source_drop[-]=not measured (no authorized data" in r.stdout.strip().splitlines()[-1]
    report = json.loads((tmp_path / "gated" / "report.json").read_text())
    assert report["passed"] is False and report["gates"][0]["value"] is None
    r = run_cli([*base, "--no-gates", "-o", tmp_path / "ungated"])
    assert r.exit_code == 0 and r.stdout.strip().splitlines()[-1].startswith("PASSED")


def test_mode_data_combinations_are_clear_errors(tmp_path, tiny_models, small_domains):
    r = run_cli([tiny_models["residual"]["export"], "--mode", "source-free", "--input-size", "16", "16",
                 "-o", tmp_path / "o", "-q"])
    assert r.exit_code == 2 and "needs at least one --unauthorized" in r.stderr
    r = run_cli([tiny_models["plain"]["export"], "--mode", "data-free", "--input-size", "16", "16",
                 "-o", tmp_path / "o", "-q"])
    assert r.exit_code == 2 and "BatchNorm" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli([tiny_models["residual"]["torchscript"], "--mode", "data-free", "--input-size", "16", "16",
                 "-o", tmp_path / "o", "-q"])
    assert r.exit_code == 2 and "TorchScript" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("fmt", ["export", "state_dict"])
def test_batchnorm_tap_records_and_restores_the_module(tiny_models, fmt):
    from mapc.taps import BatchNormTap
    m = load_model(tiny_models["residual"][fmt], arch="tests.tiny_models:residual").module
    code_before = m.code if hasattr(m, "code") else None
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        before = m(x)
        with BatchNormTap(m) as tap:
            assert tap.found
            inside = m(x)
            records = tap.take()
            assert tap.take() == []
        after = m(x)
    assert len(records) == 2 and records[0][0].shape == (3, 8, 16, 16)
    torch.testing.assert_close(records[0][1], dict(m.named_buffers())[next(
        n for n in dict(m.named_buffers()) if n.endswith("running_mean"))])
    assert code_before is None or m.code == code_before
    assert isinstance(after, torch.Tensor)
    torch.testing.assert_close(before, inside)
    torch.testing.assert_close(before, after)


@pytest.mark.parametrize("stem,warned", [("digits_cnn", True), ("digits_plain", False)])
def test_compile_warns_when_an_unauthorized_domain_is_inside_the_training_distribution(tmp_path, stem, warned):
    """The colour-trained sample sees mnistm (coloured digits) as its own training data: the source-free
    compile says so on stderr and in the reports. The grey-trained sample does not."""
    cfg = tmp_path / "sf.toml"
    cfg.write_text(f'model = "{ROOT}/samples/models/{stem}.pt2"\nmode = "source-free"\n'
                   f'[preprocess]\nsize = [32, 32]\nchannels = 3\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n'
                   f'[unauthorized]\nmnistm = "{ROOT}/samples/digits/mnistm.npz"\n'
                   f'[synthesis]\nimages = 128\nsteps = 20\n')
    out = tmp_path / "out"
    r = run_cli(["--config", cfg, "--steps", "30", "--no-gates", "-o", out, "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    report = json.loads((out / "report.json").read_text())
    feas = report["synthesis"]["feasibility"]["mnistm"]
    assert feas["separable"] is (not warned)
    assert len(lines) == int(warned)
    if warned:
        assert "'mnistm'" in lines[0] and "--authorized" in lines[0] and feas["warning"] in lines[0]
        assert feas["warning"] in (out / "report.md").read_text()

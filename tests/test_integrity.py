"""What the artifact promises survives the build: verify re-audits it, OUTDIR is replaced whole, fixed-batch
programs compile to a dynamic-batch artifact."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from mapc.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def compile_args(model, domains, out, *extra):
    return ["compile", model, "--authorized", f"mnist={domains['mnist']}", "--unauthorized", f"syn={domains['syn']}",
            "--input-size", "16", "16", "--steps", "20", "--no-gates", "-o", out, "-q", *extra]


def test_verify_reports_integrity_of_a_clean_artifact(artifact, small_domains):
    r = run("verify", artifact, "--unauthorized", f"syn={small_domains['syn']}", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout.splitlines()[0])
    assert report["integrity"]["passed"]
    assert [c["check"] for c in report["integrity"]["checks"]] == ["sealed", "zero_pattern", "no_mask_tensors",
                                                                     "no_leaks"]


def test_verify_fails_an_artifact_whose_pruned_weights_were_restored(tmp_path, artifact, small_domains):
    model = onnx.load(artifact)
    restored = 0
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim >= 2 and (a == 0).any():
            a = np.where(a == 0, np.float32(0.01), a).astype(a.dtype)
            t.CopyFrom(numpy_helper.from_array(a, t.name))
            restored += 1
    assert restored > 0
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, tampered)
    r = run("verify", tampered, "--unauthorized", f"syn={small_domains['syn']}")
    assert r.exit_code == 1, r.output
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED | ") and "integrity[zero_pattern]" in last


def test_verify_fails_an_unsealed_model(tmp_path, artifact, small_domains):
    model = onnx.load(artifact)
    del model.metadata_props[:]
    plain = tmp_path / "plain.onnx"
    onnx.save(model, plain)
    r = run("verify", plain, "--unauthorized", f"syn={small_domains['syn']}", "--input-size", "16", "16")
    assert r.exit_code == 1 and "integrity[sealed]" in r.stdout.strip().splitlines()[-1]


def test_outdir_is_replaced_as_a_whole(tmp_path, tiny_models, small_domains):
    out = tmp_path / "out"
    assert run(*compile_args(tiny_models["plain"]["export"], small_domains, out)).exit_code == 0
    (out / "protected.onnx.data").write_bytes(b"stale external data from an older, larger build")
    assert run(*compile_args(tiny_models["plain"]["export"], small_domains, out, "--seed", "3")).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [".mapc-output", "protected.onnx", "report.html", "report.json",
                                                     "report.md"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_a_failed_write_leaves_the_old_outdir_exactly_as_it_was(tmp_path, tiny_models, small_domains, monkeypatch):
    out = tmp_path / "out"
    assert run(*compile_args(tiny_models["plain"]["export"], small_domains, out)).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("mapc.compile.report_files", broken)
    r = CliRunner().invoke(main, [str(a) for a in compile_args(tiny_models["plain"]["export"], small_domains, out,
                                                               "--seed", "5")])
    assert r.exit_code == 2 and "nothing was changed" in r.stderr, r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name != "out"] == []


def test_fixed_batch_program_compiles_to_a_dynamic_batch_artifact(tmp_path, small_domains):
    from tests.tiny_models import plain
    ep = torch.export.export(plain(), (torch.zeros(4, 3, 16, 16),))    # no dynamic_shapes: batch fixed at 4
    fixed = tmp_path / "fixed.pt2"
    torch.export.save(ep, fixed)
    with pytest.raises(Exception, match="Guard failed|size"):
        torch.export.load(fixed).module()(torch.zeros(3, 3, 16, 16))
    out = tmp_path / "out"
    r = run(*compile_args(fixed, small_domains, out))
    assert r.exit_code == 0, r.output + r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["top1_agreement"] == 100.0
    sess = ort.InferenceSession(str(out / "protected.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        y = sess.run(None, {sess.get_inputs()[0].name: np.zeros((batch, 3, 16, 16), np.float32)})[0]
        assert y.shape == (batch, 10)


def test_fixed_batch_relaxation_matches_the_original_program(tmp_path):
    from mapc.models import load_model
    from tests.tiny_models import residual
    m = residual()
    ep = torch.export.export(m, (torch.zeros(2, 3, 16, 16),))
    torch.export.save(ep, tmp_path / "r.pt2")
    loaded = load_model(tmp_path / "r.pt2")
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), m(x), rtol=1e-5, atol=1e-5)
    shutil.rmtree(tmp_path)


def test_a_mask_that_prunes_nothing_is_not_shipped(tmp_path, tiny_models, small_domains):
    cfg = tmp_path / "nomask.toml"
    cfg.write_text("[mask]\nscore_init = 1000.0\n")
    out = tmp_path / "out"
    r = run(*compile_args(tiny_models["plain"]["export"], small_domains, out, "--config", cfg))
    assert r.exit_code == 1 and "prunes nothing" in r.stderr, r.output
    assert not out.exists()

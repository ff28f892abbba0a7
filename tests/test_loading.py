"""Model and data loading: accepted formats, refused pickles, one-line errors with exit code 2."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mapc.cli import main
from mapc.datasets import load_domain, parse_spec
from mapc.errors import UserError
from mapc.models import detect_format, load_model
from tests.conftest import ROOT

SAMPLE = ROOT / "samples" / "models"


def test_passes_package_does_not_import_torch():
    code = "import passes, sys; assert 'torch' not in sys.modules, 'passes imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("fname,fmt", [("digits_cnn.pt2", "export"), ("digits_cnn.torchscript.pt", "torchscript"),
                                       ("digits_cnn.state_dict.pt", "state_dict")])
def test_sample_model_loads_in_every_format_with_equal_outputs(fname, fmt):
    m = load_model(SAMPLE / fname, arch="samples.models.digits_cnn:build")
    assert m.format == fmt
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    ref = load_model(SAMPLE / "digits_cnn.state_dict.pt", arch="samples.models.digits_cnn:build").module
    with torch.no_grad():
        torch.testing.assert_close(m.module(x), ref(x), rtol=1e-5, atol=1e-5)


class _Evil:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_refused_and_nothing_in_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": _Evil(str(marker))}, f)
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(evil)
    assert not marker.exists()
    # zip-format torch.save of a full module object is refused the same way
    z = tmp_path / "module.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), z)
    assert detect_format(z) == "torch_save"
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(z)


def test_full_module_pickle_loads_only_with_trust_flag(tmp_path):
    from tests.tiny_models import plain
    p = tmp_path / "plain_full.pt"
    torch.save(plain(), p)
    with pytest.raises(UserError, match="trust-pickle"):
        load_model(p)
    m = load_model(p, trust_pickle=True)
    assert m.format == "pickle" and not m.module.training


def test_state_dict_needs_arch_and_must_fit(tmp_path):
    with pytest.raises(UserError, match="--arch"):
        load_model(SAMPLE / "digits_cnn.state_dict.pt")
    with pytest.raises(UserError, match="does not fit"):
        load_model(SAMPLE / "digits_cnn.state_dict.pt", arch="tests.tiny_models:plain")
    with pytest.raises(UserError, match="cannot import"):
        load_model(SAMPLE / "digits_cnn.state_dict.pt", arch="no_such_pkg.mod:f")


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays,message", [
    ({"labels": np.zeros(3, np.int64)}, "no 'images'"),
    ({"images": np.zeros((3, 8, 8), np.float32)}, "dtype float32, expected uint8"),
    ({"images": np.zeros((3, 8), np.uint8)}, "expected NxHxW"),
    ({"images": np.zeros((0, 8, 8), np.uint8)}, "has no images"),
    ({"images": np.zeros((3, 8, 8), np.uint8), "labels": np.array([0, 1, 12])}, "outside the model's classes"),
    ({"images": np.zeros((3, 8, 8), np.uint8), "labels": np.array([0, 1])}, "expected \\(3,\\)"),
    ({"images": np.zeros((3, 8, 8), np.uint8), "split": np.array(["train", "val", "test"])}, "only 'train' and 'test'"),
])
def test_bad_npz_is_a_user_error(tmp_path, arrays, message):
    p = _npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(UserError, match=message):
        load_domain("d", p, num_classes=10)


def test_object_arrays_are_not_unpickled(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, images=np.array([np.zeros((2, 2), np.uint8), None], dtype=object))
    with pytest.raises(UserError, match="object arrays"):
        load_domain("d", p)


def test_image_folder(tmp_path):
    from PIL import Image
    for label in ("0", "1"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "1" / "notes.txt").write_text("ignored")
    d = load_domain("folder", tmp_path, num_classes=10)
    assert d.images.shape == (6, 10, 12) and d.images.dtype == np.uint8
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1] and not d.has_split


def test_parse_spec():
    assert parse_spec("svhn=data/svhn.npz") == ("svhn", "data/svhn.npz")
    with pytest.raises(UserError):
        parse_spec("data/svhn.npz")


def _cli(args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(old)


@pytest.mark.parametrize("case", ["missing_model", "missing_data", "bad_dtype", "labels_out_of_range", "pickle",
                                  "bad_config"])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case, small_domains):
    model = str(SAMPLE / "digits_cnn.pt2")
    auth, unauth = f"mnist={small_domains['mnist']}", f"syn={small_domains['syn']}"
    out = tmp_path / "out"
    if case == "missing_model":
        args = [str(tmp_path / "nope.pt2"), "--authorized", auth, "--unauthorized", unauth]
    elif case == "missing_data":
        args = [model, "--authorized", f"mnist={tmp_path / 'none.npz'}", "--unauthorized", unauth]
    elif case == "bad_dtype":
        bad = _npz(tmp_path / "f.npz", images=np.zeros((4, 28, 28), np.float64))
        args = [model, "--authorized", auth, "--unauthorized", f"bad={bad}"]
    elif case == "labels_out_of_range":
        bad = _npz(tmp_path / "l.npz", images=np.zeros((4, 28, 28), np.uint8), labels=np.array([0, 1, 2, 10]))
        args = [model, "--authorized", auth, "--unauthorized", f"bad={bad}"]
    elif case == "pickle":
        evil = tmp_path / "evil.pt"
        marker = tmp_path / "pwned"
        with open(evil, "wb") as f:
            pickle.dump(_Evil(str(marker)), f)
        args = [str(evil), "--authorized", auth, "--unauthorized", unauth]
    else:
        cfg = tmp_path / "c.toml"
        cfg.write_text("modle = 'x.pt2'\n")
        args = ["--config", str(cfg), model, "--authorized", auth, "--unauthorized", unauth]
    r = _cli(["compile", *args, "-o", str(out), "-q"], tmp_path)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mapc: error:"), err
    assert "Traceback" not in r.output
    assert not out.exists()
    assert not (tmp_path / "pwned").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []

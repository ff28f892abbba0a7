"""Shared fixtures: small real-data domains cut from the bundled benchmark, tiny models in every format."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_models import plain, residual

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "samples" / "digits"


def subset(src: Path, dst: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write the first n_train train rows and n_test test rows of a bundled domain."""
    with np.load(src) as f:
        images, labels, split = f["images"], f["labels"], f["split"]
    tr = np.flatnonzero(split == "train")[:n_train]
    te = np.flatnonzero(split == "test")[:n_test]
    idx = np.concatenate([tr, te])
    np.savez_compressed(dst, images=images[idx], labels=labels[idx], split=split[idx])
    return dst


@pytest.fixture(scope="session")
def small_domains(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("domains")
    return {n: subset(DIGITS / f"{n}.npz", d / f"{n}.npz", 256, 128) for n in ("mnist", "mnistm", "syn", "uci")}


def save_all_formats(module: torch.nn.Module, folder: Path, name: str, size: int = 16) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, size, size)
    out = {"state_dict": folder / f"{name}.state_dict.pt", "torchscript": folder / f"{name}.torchscript.pt",
           "export": folder / f"{name}.pt2"}
    torch.save(module.state_dict(), out["state_dict"])
    torch.jit.save(torch.jit.script(module), out["torchscript"])
    ep = torch.export.export(module, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, out["export"])
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    d = tmp_path_factory.mktemp("models")
    return {"residual": save_all_formats(residual(), d, "residual"), "plain": save_all_formats(plain(), d, "plain")}


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, tiny_models, small_domains) -> Path:
    """A protected artifact of the tiny plain model (30 mask steps), with its compile report beside it."""
    from click.testing import CliRunner

    from mapc.cli import main
    out = tmp_path_factory.mktemp("compiled")
    r = CliRunner().invoke(main, ["compile", str(tiny_models["plain"]["export"]), "--authorized",
                                  f"mnist={small_domains['mnist']}", "--unauthorized", f"syn={small_domains['syn']}",
                                  "--input-size", "16", "16", "--steps", "30", "--max-source-drop", "99",
                                  "-o", str(out), "-q"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out / "protected.onnx"

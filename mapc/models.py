"""Loading source models without executing untrusted code by default.

Accepted formats, detected from the file's contents (not its suffix):

- torch.export program (``.pt2``): ``torch.export.load``; the graph is data;
- TorchScript archive: ``torch.jit.load``; TorchScript's own restricted loader;
- state_dict: ``torch.load(weights_only=True)`` plus ``--arch package.module:factory``;
- fully pickled ``nn.Module``: only with ``--trust-pickle`` (``weights_only=False``
  runs arbitrary code from the file). Without the flag the restricted
  unpickler refuses the file before any object in it is built.

Invariant: the returned module is in eval mode and its parameters are the
file's values; nothing here trains or modifies them.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

@dataclass
class LoadedModel:
    module: torch.nn.Module
    format: str
    path: str


def detect_format(path: Path) -> str:
    """'export', 'torchscript' or 'torch_save' (a state_dict or a pickled module)."""
    if not zipfile.is_zipfile(path):
        return "torch_save"  # legacy non-zip torch.save files; weights_only decides
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
        return "export"
    if any(t.startswith("code/") for t in tails) or "constants.pkl" in tails:
        return "torchscript"
    return "torch_save"


def import_factory(spec: str):
    """``package.module:factory`` -> callable. The current directory is importable, as for uvicorn."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise UserError(f"--arch {spec!r} must look like package.module:factory")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UserError(f"--arch {spec!r}: cannot import {mod_name!r} ({e}); run from the folder that holds it "
                        f"or install its package")
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise UserError(f"--arch {spec!r}: {mod_name} has no callable {attr!r}")
    return factory


def load_model(path: str | Path, arch: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such model file; pass a .pt2, TorchScript .pt or state_dict file")
    fmt = detect_format(p)
    if fmt == "export":
        try:
            ep = torch.export.load(str(p))
        except Exception as e:  # corrupted archive, version skew
            raise UserError(f"{p}: not a loadable torch.export program ({type(e).__name__}: {_short(e)})")
        return LoadedModel(ep.module(), "export", str(p))
    if fmt == "torchscript":
        try:
            m = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:
            raise UserError(f"{p}: not a loadable TorchScript archive ({type(e).__name__}: {_short(e)})")
        return LoadedModel(m.eval(), "torchscript", str(p))
    return _load_torch_save(p, arch, trust_pickle)


def _load_torch_save(p: Path, arch: str | None, trust_pickle: bool) -> LoadedModel:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise UserError(f"{p}: is a full pickle ({_short(e, 80)}); loading it would run code from the file. "
                            f"Re-save it as a state_dict or TorchScript, or pass --trust-pickle if you trust its author")
        obj = None
    except Exception as e:
        raise UserError(f"{p}: not a torch model file ({type(e).__name__}: {_short(e)})")
    if obj is None:  # trusted full pickle
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as e:
            raise UserError(f"{p}: --trust-pickle load failed ({type(e).__name__}: {_short(e)})")
        if not isinstance(obj, torch.nn.Module):
            raise UserError(f"{p}: the pickle holds a {type(obj).__name__}, not an nn.Module")
        return LoadedModel(obj.eval(), "pickle", str(p))
    if isinstance(obj, torch.nn.Module):  # allow-listed module types only; rare
        return LoadedModel(obj.eval(), "pickle", str(p))
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{p}: holds a {type(obj).__name__}, not a state_dict of tensors")
    if arch is None:
        raise UserError(f"{p}: is a state_dict; say which architecture builds it with --arch package.module:factory")
    module = import_factory(arch)()
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"--arch {arch}: the factory returned a {type(module).__name__}, not an nn.Module")
    try:
        module.load_state_dict(obj, strict=True)
    except RuntimeError as e:
        raise UserError(f"{p}: does not fit --arch {arch}: {_short(e, 200)}")
    return LoadedModel(module.eval(), "state_dict", str(p))


def _short(e: Exception, n: int = 160) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."

"""Loading source models without executing untrusted code by default.

Accepted formats, detected from the file's contents (not its suffix):

- torch.export program (``.pt2``): the archive is inspected first (``archive_check``:
  no pickled weight, constant or sample input, no compiled code), then read by
  ``torch.export.load`` with ``torch.load`` forced to ``weights_only=True``. A program
  exported with a fixed batch size is relaxed to any batch (its batch guard removed,
  batch-sized reshapes made -1) and checked against the fixed-batch program;
- TorchScript archive: ``torch.jit.load``; TorchScript's own unpickler, which builds
  TorchScript types only and cannot call Python;
- state_dict: ``torch.load(weights_only=True)`` plus ``--arch package.module:factory``;
- fully pickled ``nn.Module``: only with ``--trust-pickle`` (``weights_only=False``
  runs arbitrary code from the file). Without the flag the restricted
  unpickler refuses the file before any object in it is built.

Invariant: the returned module is in eval mode, its parameters are the
file's values (all finite), and nothing here trains or modifies them.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import sys
import warnings
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
    except Exception as e:  # SyntaxError, or the module raising while it is imported
        raise UserError(f"--arch {spec!r}: importing {mod_name!r} failed ({type(e).__name__}: {_short(e)}); "
                        f"fix the module")
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise UserError(f"--arch {spec!r}: {mod_name} has no callable {attr!r}")
    return factory


def load_model(path: str | Path, arch: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such model file; pass a .pt2, TorchScript .pt or state_dict file")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: the file is empty; pass a .pt2, TorchScript .pt or state_dict file")
    fmt = detect_format(p)
    if fmt == "export":
        loaded = LoadedModel(_load_export(p, trust_pickle), "export", str(p))
    elif fmt == "torchscript":
        if not trust_pickle:
            from .archive_check import check_torchscript
            check_torchscript(p)
        try:
            m = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:
            raise UserError(f"{p}: not a loadable TorchScript archive ({type(e).__name__}: {_short(e)})")
        loaded = LoadedModel(m.eval(), "torchscript", str(p))
    else:
        loaded = _load_torch_save(p, arch, trust_pickle)
    check_finite(loaded)
    return loaded


def check_finite(loaded: LoadedModel) -> None:
    """NaN or inf in a weight or buffer makes every figure meaningless: refuse the model."""
    for name, t in [*loaded.module.named_parameters(), *loaded.module.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{loaded.path}: tensor {name!r} holds NaN or infinite values; fix the model")


def _load_export(p: Path, trust_pickle: bool) -> torch.nn.Module:
    from .archive_check import check_pt2, restricted_torch_load
    if not trust_pickle:
        check_pt2(p)
    guard = contextlib.nullcontext() if trust_pickle else restricted_torch_load()
    try:
        with guard, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(str(p))
    except UserError:
        raise
    except Exception as e:  # corrupted archive, version skew
        raise UserError(f"{p}: not a loadable torch.export program ({type(e).__name__}: {_short(e)})")
    return any_batch_module(ep, p)


def fixed_batch(ep) -> int | None:
    """The batch size a program was exported with when it is static, else None (dynamic)."""
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if val is None or not hasattr(val, "shape") or len(val.shape) == 0:
                return None
            return val.shape[0] if isinstance(val.shape[0], int) else None
    return None


def any_batch_module(ep, p: Path) -> torch.nn.Module:
    """``ep.module()``, relaxed to any batch size when the program was exported with a fixed one.

    torch.export's default records a static batch N and guards the input on it. The relaxed module drops the
    guard and writes -1 for N in reshapes; it is accepted only if, on 2N+1 random rows, it matches the original
    program run in chunks of N to 1e-5.
    """
    module = ep.module()
    n = fixed_batch(ep)
    if n is None:
        return module
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and ("view" in str(node.target) or "reshape" in str(node.target)):
            shape = node.args[1] if len(node.args) > 1 else None
            if isinstance(shape, (list, tuple)) and shape and shape[0] == n:
                node.args = (node.args[0], [-1, *shape[1:]], *node.args[2:])
    graph.lint()
    module.recompile()
    example = next((nd.meta["val"] for nd in ep.graph.nodes if nd.op == "placeholder"
                    and nd.name in set(ep.graph_signature.user_inputs)), None)
    try:
        x = torch.randn(2 * n + 1, *example.shape[1:], dtype=example.dtype)
        reference = ep.module()
        with torch.no_grad():
            want = torch.cat([reference(torch.cat([c, x[:n - len(c)]]) if len(c) < n else c)[:len(c)]
                              for c in x.split(n)])
            got = module(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    except Exception as e:
        raise UserError(f"{p}: the program was exported with a fixed batch of {n} and could not be relaxed to "
                        f"other batch sizes ({type(e).__name__}: {_short(e, 100)}); re-export it with "
                        f"dynamic_shapes={{'x': {{0: torch.export.Dim('batch')}}}}")
    return module


def _load_torch_save(p: Path, arch: str | None, trust_pickle: bool) -> LoadedModel:
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _names_a_global(e):
            raise UserError(f"{p}: {_what_is_it(p)}")
        if not trust_pickle:
            raise UserError(f"{p}: is a full pickle ({_short(e, 80)}); loading it would run code from the file. "
                            f"Re-save it as a state_dict or TorchScript, or pass --trust-pickle if you trust its author")
        obj = None
    except Exception as e:
        raise UserError(f"{p}: {_what_is_it(p)} ({type(e).__name__}: {_short(e, 80)})")
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
    factory = import_factory(arch)
    try:
        module = factory()
    except Exception as e:
        raise UserError(f"--arch {arch}: the factory raised {type(e).__name__}: {_short(e)}; fix the factory")
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"--arch {arch}: the factory returned a {type(module).__name__}, not an nn.Module")
    try:
        module.load_state_dict(obj, strict=True)
    except RuntimeError as e:
        raise UserError(f"{p}: does not fit --arch {arch}: {_short(e, 200)}")
    return LoadedModel(module.eval(), "state_dict", str(p))


def _names_a_global(e: Exception) -> bool:
    """The restricted unpickler refused a class or function the file names: a real pickle of objects."""
    text = str(e)
    return "Unsupported global" in text or "GLOBAL" in text or "not an allowed global" in text


def _what_is_it(p: Path) -> str:
    """What a file that is no torch model looks like, for the error message."""
    with open(p, "rb") as f:
        head = f.read(256)
    if head[:1] == b"\x80":
        return ("is a Python pickle, not a torch model archive; loading it would run code from the file. Re-save the "
                "model as a state_dict, TorchScript or torch.export program (--trust-pickle only if you trust its "
                "author)")
    if head[:1] == b"\x08" and any(k in head.lower() for k in (b"pytorch", b"onnx", b"ai.onnx")):
        return ("looks like an ONNX model; mapc compile takes the torch model it came from (.pt2, TorchScript or "
                "state_dict), and `mapc verify` takes .onnx artifacts")
    return "not a torch model file (not a torch.export, TorchScript or torch.save archive); check the path"


def _short(e: Exception, n: int = 160) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."

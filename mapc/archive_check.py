"""Inspecting model archives before torch reads them: no code runs from an untrusted file.

Threat: ``torch.export.load`` unpickles parts of a ``.pt2`` archive with
``weights_only=False`` (a weight or constant flagged ``use_pickle``, sample
inputs that fail the restricted loader, the legacy single-file weights, the
pre-2.5 archive layout), ``pickle.loads`` opaque constants and loads compiled
AOTInductor libraries. Any of these runs code chosen by the file's author.

Invariant enforced here, on the zip listing and the small JSON configs only
(nothing in the archive is unpickled to decide):

- every member of a ``.pt2`` lies under one archive root and matches the
  allow-list below; compiled code (``data/aotinductor/``), ExecuTorch / MTIA
  payloads, legacy weight files and custom/opaque constants are refused;
- every weight and constant entry in the payload configs has
  ``use_pickle = false`` and names a raw tensor record that exists;
- the sample-inputs member (the one pickle torch.export keeps) loads under
  torch's restricted unpickler (``weights_only=True``); it is never given to
  the unrestricted one;
- the program JSON names no Python module to import: torch's pytree decoder
  imports the module a ``defaultdict`` context or an ``__enum__`` value names
  (``importlib.import_module``), which runs that module's code; plain
  tensor-in, tensor-out programs never carry either.

``restricted_torch_load`` is the second wall: while torch.export deserialises a
checked archive, ``torch.load`` is forced to ``weights_only=True``, and
``pickle.loads`` inside torch's archive reader and ``importlib`` inside torch's
pytree decoder refuse, so a check that missed something still cannot run code
that way.

The program itself is checked as data (``_check_program_json``): operators
must be aten/prims (or ``_operator``) and not in a deny-list of ops that touch
files or the console; guards must be plain size comparisons (torch ``exec``s
them). A deny-list is not a proof: a graph is code in a restricted language,
and a model from an unknown source deserves the care code does.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import zipfile
from pathlib import Path

from .errors import UserError

# member tails (after the archive root) a torch.export.save archive may hold
_ALLOWED = [
    r"archive_format", r"archive_version", r"byteorder", r"version", r"\.data/version", r"\.data/serialization_id",
    r"models/[\w.\-]+\.json",
    r"data/weights/[\w.\-]+", r"data/constants/[\w.\-]+",
    r"data/sample_inputs/[\w.\-]+\.pt",
    r"extra/[\w.\-/]+",
]
_ALLOWED_RE = re.compile("^(" + "|".join(_ALLOWED) + ")$")
_CONFIG_RE = re.compile(r"^data/(weights|constants)/[\w.\-]+_(weights|constants)_config\.json$")
_TENSOR_RECORD = {"weights": "weight_", "constants": "tensor_"}
MAX_CONFIG_BYTES = 64 << 20


def check_pt2(path: Path) -> None:
    """Raise UserError unless ``path`` is a torch.export archive whose loading cannot run code."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            names = [i.filename for i in infos if not i.is_dir()]
            roots = {n.split("/", 1)[0] for n in names if "/" in n}
            if len(roots) != 1 or any("/" not in n for n in names):
                raise UserError(f"{path}: not a torch.export archive (expected one root folder, found "
                                f"{sorted(roots)[:3]}); re-save it with torch.export.save")
            root = roots.pop() + "/"
            tails = {n[len(root):]: n for n in names}
            odd = sorted(t for t in tails if not _ALLOWED_RE.match(t))
            if odd:
                raise UserError(f"{path}: archive member {odd[0]!r} is not part of a plain torch.export program "
                                f"(compiled code, a pickled object or an unknown payload); refusing to load it. "
                                f"Re-export with torch.export.save, or convert to a state_dict")
            if "archive_format" not in tails:
                raise UserError(f"{path}: an old torch.export layout without archive_format; it is loaded through "
                                f"pickle, so mapc refuses it. Re-save it with a current torch.export.save")
            records = _check_payload_configs(path, z, tails)
            for tail, full in tails.items():
                if tail.startswith("models/"):
                    _check_program_json(path, tail, z.read(full))
            for tail, full in tails.items():
                if tail.startswith(("data/weights/", "data/constants/")) and not tail.endswith(".json") \
                        and tail not in records:
                    raise UserError(f"{path}: archive member {tail!r} is not a raw tensor record listed in the "
                                    f"archive's configs (legacy pickled weights?); refusing to load it")
            for tail, full in tails.items():
                if tail.startswith("data/sample_inputs/"):
                    _check_restricted_pickle(path, tail, z.read(full))
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: not a readable zip archive ({e}); re-save the model")


def _check_payload_configs(path: Path, z: zipfile.ZipFile, tails: dict[str, str]) -> set[str]:
    """Every entry raw (not pickled); returns the record tails the configs reference."""
    records: set[str] = set()
    for tail, full in tails.items():
        m = _CONFIG_RE.match(tail)
        if not m:
            if tail.endswith(".json") and tail.startswith("data/"):
                raise UserError(f"{path}: unexpected config {tail!r} in the archive; refusing to load it")
            continue
        kind = m.group(1)
        if m.group(2) != kind:
            raise UserError(f"{path}: unexpected config {tail!r} in the archive; refusing to load it")
        if z.getinfo(full).file_size > MAX_CONFIG_BYTES:
            raise UserError(f"{path}: {tail} is implausibly large; refusing to load it")
        try:
            config = json.loads(z.read(full)).get("config", {})
        except (ValueError, AttributeError):
            raise UserError(f"{path}: {tail} is not valid JSON; re-save the model")
        if not isinstance(config, dict):
            raise UserError(f"{path}: {tail} has no 'config' table; re-save the model")
        for fqn, entry in config.items():
            if not isinstance(entry, dict):
                raise UserError(f"{path}: {tail}: entry {fqn!r} is malformed; re-save the model")
            record = str(entry.get("path_name", ""))
            if entry.get("use_pickle") is not False:
                raise UserError(f"{path}: {kind[:-1]} {fqn!r} is stored as a pickle, which would run code from "
                                f"the file; re-save it with tensors only (or convert to a state_dict)")
            if not record.startswith(_TENSOR_RECORD[kind]) or "/" in record:
                raise UserError(f"{path}: {kind[:-1]} {fqn!r} is a {record.split('_')[0] or 'unnamed'} object, "
                                f"not a tensor; mapc loads plain tensor programs only")
            rec_tail = f"data/{kind}/{record}"
            if rec_tail not in tails:
                raise UserError(f"{path}: {kind[:-1]} {fqn!r} points at a missing record {record!r}; re-save the model")
            records.add(rec_tail)
    return records


_IMPORTING_KEYS = {"default_factory_module", "__enum__"}
_ALLOWED_TARGETS = re.compile(r"^(torch\.ops\.(aten|prims)\.[\w.]+|_operator\.\w+)$")
_DENIED_OPS = ("from_file", "_print", "save", "_load")   # aten ops that touch files or the console
_GUARD_ATOM = re.compile(r"L(\[(?:'\w+'|\"\w+\"|\d+)\])+|\.(size|stride)\(\)|\[\d+\]|\b(and|or|not)\b")


def _check_program_json(path: Path, tail: str, data: bytes) -> None:
    """The program is data torch will not turn into code: no module imports, only aten/prims ops that touch
    no files, guards that are plain size comparisons (torch exec()s them into a guard function)."""
    try:
        program = json.loads(data)
    except ValueError:
        raise UserError(f"{path}: {tail} is not valid JSON; re-save the model")

    def refuse(why: str):
        raise UserError(f"{path}: {tail} {why}; refusing to load it. Export the model with plain tensor inputs, "
                        f"outputs and operators, or pass --trust-pickle if you trust its author")

    def walk(node, depth=0):
        if depth > 200:
            refuse("is nested implausibly deep")
        if isinstance(node, dict):
            for k, v in node.items():
                if k in _IMPORTING_KEYS:
                    refuse(f"asks torch to import a Python module by name ({k})")
                if k == "target" and isinstance(v, str):
                    if not _ALLOWED_TARGETS.match(v) or any(f".{op}." in v or v.endswith(f".{op}") for op in _DENIED_OPS):
                        refuse(f"calls {v!r}, which is not a plain tensor operator")
                walk(v, depth + 1)
        elif isinstance(node, list):
            for v in node:
                walk(v, depth + 1)
        elif isinstance(node, str) and node[:1] in "[{":
            try:
                inner = json.loads(node)   # treespecs are JSON inside JSON; decoding undoes \u escapes
            except ValueError:
                return
            walk(inner, depth + 1)

    walk(program)
    for guard in program.get("guards_code") or []:
        rest = _GUARD_ATOM.sub("", str(guard))
        if not re.fullmatch(r"[ \t\d.()<>=!+\-*/%]*", rest):
            refuse(f"holds a guard that is not a plain size comparison ({str(guard)[:40]!r})")


def check_torchscript(path: Path) -> None:
    """Refuse TorchScript code that runs at load time (__setstate__) or reads files (from_file)."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if "/code/" in info.filename and info.filename.endswith(".py"):
                    code = z.read(info.filename)
                    for token in (b"__setstate__", b"from_file", b"aten::_load"):
                        if token in code:
                            raise UserError(f"{path}: its TorchScript code uses {token.decode()!r}, which runs at "
                                            f"load time or reads files; refusing to load it (pass --trust-pickle "
                                            f"only if you trust its author)")
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: not a readable TorchScript archive ({e})")


def _check_restricted_pickle(path: Path, tail: str, data: bytes) -> None:
    import torch
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of the restricted loader means refuse
        raise UserError(f"{path}: archive member {tail!r} holds more than tensor data "
                        f"({type(e).__name__}); refusing to load it. Re-export without custom sample inputs")


@contextlib.contextmanager
def restricted_torch_load():
    """While active, ``torch.load`` always runs with ``weights_only=True`` and torch's archive reader cannot
    ``pickle.loads``: a defence in depth behind ``check_pt2``."""
    import torch
    from torch.export.pt2_archive import _package

    original_load = torch.load

    def forced(*args, **kwargs):
        kwargs["weights_only"] = True
        return original_load(*args, **kwargs)

    class _NoPickle:
        def __getattr__(self, name):
            raise UserError("the archive asked to unpickle an object; refusing (pass --trust-pickle only "
                            "for a file you trust)")

    class _NoImport:
        def import_module(self, name, *args, **kwargs):
            raise UserError(f"the archive asked torch to import module {name!r}; refusing")

    import torch.utils._pytree as pytree
    saved_pickle = getattr(_package, "pickle", None)
    saved_importlib = getattr(pytree, "importlib", None)
    torch.load = forced
    if saved_pickle is not None:
        _package.pickle = _NoPickle()
    if saved_importlib is not None:
        pytree.importlib = _NoImport()
    try:
        yield
    finally:
        torch.load = original_load
        if saved_pickle is not None:
            _package.pickle = saved_pickle
        if saved_importlib is not None:
            pytree.importlib = saved_importlib

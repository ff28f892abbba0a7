"""Atomic output: an output folder appears complete or not at all, and is replaced as a whole.

Files are written into a hidden staging folder beside the target. Only after
every file is written is the staging folder renamed to the target: an
existing target is first renamed aside, then removed once the new folder is
in place, so stale files (an old ``protected.onnx.data`` beside a new artifact)
never survive and nothing is merged. On any error before the swap the staging
folder is removed and the old target is left exactly as it was; if the swap
itself fails, the old target is renamed back.

Safety: a target is only ever replaced if it is empty, or carries mapc's
marker file (``MARKER``, written into every output folder) and nothing but the
files mapc writes (``OWNED``); compile refuses anything else before work starts.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


MARKER = ".mapc-output"
OWNED = frozenset({MARKER, "protected.onnx", "protected.onnx.data", "report.json", "report.md", "report.html"})


def foreign_entries(target: Path) -> list[str]:
    """Names in ``target`` that mapc did not write: none when it is absent, empty, or a marked mapc output folder
    holding only mapc's files; every name when it holds files but no marker."""
    if not target.is_dir():
        return []
    names = sorted(p.name for p in target.iterdir())
    if names and not (target / MARKER).is_file():
        return names
    return [n for n in names if n not in OWNED or not (target / n).is_file()]


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing ancestor: where creating ``path`` would start."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def can_create(path: Path) -> bool:
    """True when ``path`` could be created or replaced: its nearest existing ancestor is a writable folder."""
    start = nearest_existing(Path(path).absolute().parent)
    return start.is_dir() and os.access(start, os.W_OK | os.X_OK)


@contextlib.contextmanager
def staged_dir(target: str | Path):
    """Yield a staging folder; on success it replaces ``target`` as a whole."""
    target = Path(target)
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=parent))
    try:
        yield stage
        (stage / MARKER).write_text("written by mapc; this folder is replaced as a whole by the next build\n")
        foreign = foreign_entries(target)
        if foreign:  # checked before work started too; a folder may have changed meanwhile
            raise FileExistsError(f"{target} now holds files mapc did not write ({foreign[0]})")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)   # mkdtemp makes 0700; give the folder ordinary permissions
        _swap_in(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _swap_in(stage: Path, target: Path) -> None:
    if not target.exists():
        os.rename(stage, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=stage.parent))
    aside.rmdir()                      # reserve a unique name, then move the old folder there
    os.rename(target, aside)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

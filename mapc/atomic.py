"""Atomic output: an output folder appears complete or not at all.

Files are written into a hidden staging folder beside the target and moved
into place with ``os.replace`` only after every file is written; on any
error the staging folder is removed and an existing target is left as it was.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def staged_dir(target: str | Path):
    """Yield a staging folder; on success its files replace those of ``target``."""
    target = Path(target)
    parent = target.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
    try:
        yield stage
        target.mkdir(exist_ok=True)
        for f in stage.iterdir():
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


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

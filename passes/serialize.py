"""Writing artifacts: one self-contained .onnx file, or .onnx + external data past protobuf's 2 GB limit.

Invariant: the file(s) written load back with ``onnx.load(path)`` to the same
model; a model whose serialized size exceeds ``external_threshold`` bytes
keeps its tensors (those of at least 1 KiB) in ``<name>.data`` beside it,
and is checked by path (``onnx.checker`` cannot check it in memory).
"""
from __future__ import annotations

from pathlib import Path

import onnx

PROTOBUF_LIMIT = 2 ** 31 - 1


def save_model(model: onnx.ModelProto, path: str | Path, external_threshold: int = PROTOBUF_LIMIT) -> list[Path]:
    """Write ``model`` to ``path``; return every file written."""
    path = Path(path)
    if model.ByteSize() <= external_threshold:
        path.write_bytes(model.SerializeToString())
        return [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
    return [path, data]

"""Pass shape and pipeline runner.

A pass is an object with a ``name``, a one-line ``description`` and
``__call__(model: onnx.ModelProto) -> PassResult``. The IR is ONNX
``ModelProto`` throughout. A pass may edit the proto it is given: the runner
hands the pipeline a private deep copy, so the caller's model is never touched.

The runner records, for every pass: name, changed or not, seconds, node count
and initializer bytes before and after, and the pass's own details. A pass
that finds the model broken raises ``PassError`` naming itself; the pipeline
stops there.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

import onnx


class PassError(Exception):
    """A pass refused the model; the message starts with the pass name."""

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"{pass_name}: {message}")
        self.pass_name = pass_name


@dataclass
class PassResult:
    model: onnx.ModelProto
    changed: bool
    details: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    name: str
    description: str

    def __call__(self, model: onnx.ModelProto) -> PassResult: ...


@dataclass
class PassRecord:
    name: str
    changed: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    initializer_bytes_before: int
    initializer_bytes_after: int
    details: dict[str, Any]

    def to_dict(self) -> dict:
        return asdict(self)


def node_count(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            n = 1
            for d in t.dims:
                n *= d
            total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


# Passes the protection's integrity rests on: a pipeline never runs without them (name -> why).
MANDATORY = {
    "fold_masks": "it writes the mask into the weights; without it the artifact is the unprotected model",
    "seal": "it records the preprocessing and the weights' zero-pattern digest that `mapc verify` checks",
    "audit": "it proves the artifact carries the mask and no unmasked copy of a weight",
    "check": "it proves the artifact is a valid ONNX model",
}


def run_pipeline(model: onnx.ModelProto, passes: Sequence[Pass],
                 skip: Sequence[str] = ()) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Run ``passes`` in order on a copy of ``model``; passes named in ``skip`` are not run."""
    names = [p.name for p in passes]
    unknown = set(skip) - set(names)
    if unknown:
        raise ValueError(f"cannot skip {sorted(unknown)}: the pipeline has {names}")
    forbidden = sorted(set(skip) & set(MANDATORY))
    if forbidden:
        raise ValueError(f"cannot skip {forbidden}: {MANDATORY[forbidden[0]]}")
    current = onnx.ModelProto()
    current.CopyFrom(model)
    records = []
    for p in passes:
        if p.name in skip:
            continue
        nb, bb = node_count(current), initializer_bytes(current)
        t0 = time.perf_counter()
        result = p(current)
        dt = time.perf_counter() - t0
        current = result.model
        records.append(PassRecord(p.name, bool(result.changed), dt, nb, node_count(current), bb,
                                  initializer_bytes(current), result.details))
    return current, records

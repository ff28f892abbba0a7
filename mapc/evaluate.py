"""Measuring artifacts with onnxruntime.

Invariant: every accuracy mapc reports for an artifact comes from an
onnxruntime session over that artifact's bytes, on preprocessed test rows,
and names the execution provider that actually ran
(``session.get_providers()``; ``get_available_providers()`` lies on CPU
machines with the GPU wheel).

Metrics (see the README's definitions):
    acc        = 100 * mean(argmax(logits) == label)
    source drop ΔS = acc_orig(authorized) - acc_prot(authorized)         (points)
    target drop ΔT = acc_orig(unauthorized) - acc_prot(unauthorized)     (points, per domain)
    ST-D       = ΔS / ΔT, reported only where ΔT > 0 (lower is better)
    95 % CI    = Wilson score interval on the accuracy
"""
from __future__ import annotations

import math
import re
import time

import numpy as np
import onnx
import onnxruntime as ort

from .errors import UserError


def providers_for(device: str) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise UserError("--device cuda: this onnxruntime has no CUDA provider; install onnxruntime-gpu "
                            "or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def session(model: onnx.ModelProto | bytes | str, device: str = "cpu", threads: int = 0,
            source: str | None = None) -> ort.InferenceSession:
    """An onnxruntime session. ``source`` names a user's file: its load errors are then bad input (UserError).
    ``device="cuda"`` is an error unless CUDA actually runs the session."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # a failed CUDA load is reported via get_providers(), not the console
    if threads:
        opts.intra_op_num_threads = threads
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    providers = providers_for(device)
    if device in ("auto", "cuda"):
        # the GPU wheel lists CUDA even where its libraries are missing; a failed load then falls
        # back to CPU (auto) or is refused below (cuda) after a console error. Keep the console
        # quiet; get_providers() says what ran, and the refusal is one line.
        ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as e:
        if device == "cuda":
            raise UserError(f"onnxruntime could not start CUDA ({' '.join(str(e).split())[:160]}); use --device cpu")
        if source is not None:
            reason = " ".join(str(e).split())
            reason = reason.split(" failed:", 1)[-1].strip() if " failed:" in reason else reason
            located = re.search(r"\.cc:\d+ \S+?\(.*?\) (\S.*)$", reason)   # drop the C++ source location
            reason = located.group(1) if located else reason
            raise UserError(f"{source}: onnxruntime cannot load this model ({reason[:200]})")
        raise
    if device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise UserError("CUDA was requested but onnxruntime runs on " + ", ".join(sess.get_providers()) +
                        " (CUDA or cuDNN libraries missing?); install them or use the cpu provider")
    return sess


def check_input_fits(sess: ort.InferenceSession, x, data_name: str) -> None:
    """Preprocessed rows (an array, or one row's shape) must have the model input's static dimensions (batch
    excepted)."""
    inp = sess.get_inputs()[0]
    want = inp.shape[1:]
    row = tuple(x) if isinstance(x, tuple) else tuple(x.shape[1:])
    if len(want) != len(row) or any(isinstance(w, int) and w != g for w, g in zip(want, row)):
        raise UserError(f"{data_name}: rows preprocess to {row} but the model's input "
                        f"{inp.name!r} is {inp.shape}; fix --input-size/--channels (or the sealed preprocessing)")


def run_logits(sess: ort.InferenceSession, x, batch: int = 512) -> np.ndarray:
    """Logits on an array or on ``mapc.rows.Rows`` (read a batch at a time)."""
    from .rows import batches_of
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: xb})[0] for xb in batches_of(x, batch)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean() * 100.0)


def wilson_interval(acc_percent: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval, in percent."""
    if n == 0:
        return (0.0, 100.0)
    p = acc_percent / 100.0
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, (centre - half) * 100), min(100.0, (centre + half) * 100))


def st_d(source_drop: float, target_drop: float) -> float | None:
    return source_drop / target_drop if target_drop > 0 else None


def latency_pair_ms(a: ort.InferenceSession, b: ort.InferenceSession, shape: tuple[int, ...],
                    repeats: int = 20) -> tuple[float, float]:
    """Median latency of two sessions on the same input, runs interleaved (a, b, a, b, ...) so that
    machine noise and frequency drift hit both alike. Milliseconds. ``shape[0]`` is the batch (callers cap
    it for large inputs: ``mapc.rows.rows_per_batch``)."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = [(s, {s.get_inputs()[0].name: x}) for s in (a, b)]
    for s, f in feeds:
        s.run(None, f)
    times = ([], [])
    for _ in range(repeats):
        for i, (s, f) in enumerate(feeds):
            t0 = time.perf_counter()
            s.run(None, f)
            times[i].append((time.perf_counter() - t0) * 1000)
    return float(np.median(times[0])), float(np.median(times[1]))

"""Ownership watermark: a secret key whose trigger the protected model fails on, and the test that shows it.

Key: 32 random bytes in a file the owner keeps (created by ``mapc compile --watermark KEYFILE`` when it does
not exist); it is never written into the artifact or a report.

Trigger of a key for an input of shape (C, H, W), a pure function of both:

    seed  = sha256("mapc-watermark-v1" | key | C,H,W)
    tile  = a C x TILE x TILE array of offsets in {-AMPLITUDE, 0, +AMPLITUDE} (pixel scale [0, 1]), each
            entry drawn with probability 1/3 from the seeded generator
    delta = the tile repeated over H x W
    stamp(x) = normalise(clip(pixels(x) + delta, 0, 1))     on the model's normalised input x

Compile (``mapc compile --watermark``) adds a hidden unauthorized domain, the authorized train rows
stamped with the key's trigger, and keeps authorized rows stamped with TRAIN_CONTROLS other patterns
(keys derived from the secret one) as authorized: the mask learns to fail on *this* pattern, not on
sparse noise in general.

Test (``mapc verify --ownership KEYFILE SUSPECT``): on n labelled authorized rows, each row is stamped
with the key's trigger and with one of VERIFY_CONTROLS control patterns (other keys derived from the
secret one, never used in training). With b = rows right under the control pattern and wrong under the
key's, c = the reverse, a model that treats the key like any other pattern of the same statistics has
b ~ Binomial(b + c, 1/2) (an exact one-sided McNemar test):

    p = P(X >= b | X ~ Binomial(b + c, 1/2))

OWNED when p < ALPHA *and* the key's trigger takes at least MIN_EFFECT of the control accuracy away
(key accuracy <= (1 - MIN_EFFECT) x control accuracy). Comparing against control patterns rather than
clean rows keeps a model that is merely sensitive to noise from reading as owned. The effect-size bar
keeps a wrong key from reading as owned: a 3x3 tile has 27 entries, so now and then another key's tile
resembles the owner's and the watermarked model reacts to it a little, which with 2,000 rows is
"significant" (measured on the sample: 2 of 20 wrong keys at p < 1e-6, with 77 and 92 % key accuracy
against 95 % control, while the owner's key takes accuracy to 14 %).
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np

from .errors import UserError

KEY_BYTES = 32
TILE = 3
AMPLITUDE = 0.15
TRAIN_CONTROLS = 16
DOMAIN_WEIGHT = 0.1     # the hidden domain's weight in the unauthorized term (others: 1)
CONTROL_SHARE = 0.25     # authorized train rows also kept stamped with a control pattern
VERIFY_CONTROLS = 8
ALPHA = 1e-6
MIN_EFFECT = 0.5         # the key's trigger must remove at least half of the control accuracy


def load_or_create_key(path: str | Path) -> tuple[bytes, bool]:
    """(key, created): read a 32-byte key file, or create one (mode 0600) when the file does not exist."""
    p = Path(path)
    if p.exists():
        if not p.is_file():
            raise UserError(f"{p}: the watermark key path is not a file")
        key = p.read_bytes()
        if len(key) != KEY_BYTES:
            raise UserError(f"{p}: a watermark key is {KEY_BYTES} bytes, this file has {len(key)}; pass the key file "
                            f"mapc created, or a path that does not exist yet to create one")
        return key, False
    if not p.parent.is_dir():
        raise UserError(f"{p}: the folder for the new watermark key does not exist")
    key = os.urandom(KEY_BYTES)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
    except OSError as e:
        raise UserError(f"{p}: cannot create the watermark key ({e.strerror or e})")
    return key, True


def read_key(path: str | Path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such watermark key file")
    return load_or_create_key(p)[0]


def derived_key(key: bytes, purpose: str, i: int) -> bytes:
    return hashlib.sha256(b"mapc-watermark-derived" + key + purpose.encode() + i.to_bytes(4, "big")).digest()


def trigger(key: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """The key's pixel-offset pattern for one (C, H, W) input, float32 in pixel units: a TILE x TILE x C tile
    of offsets in {-AMPLITUDE, 0, +AMPLITUDE} (each with probability 1/3, drawn from the key), repeated over the
    image. A tile a 3x3 convolution can match is what a pruned network can learn to react to."""
    c, h, w = (int(s) for s in shape)
    seed = hashlib.sha256(b"mapc-watermark-v1" + key + np.array([c, h, w], ">u4").tobytes()).digest()
    rng = np.random.default_rng(int.from_bytes(seed, "big"))
    tile = rng.integers(-1, 2, size=(c, TILE, TILE)).astype(np.float32) * AMPLITUDE
    reps = (1, -(-h // TILE), -(-w // TILE))
    return np.ascontiguousarray(np.tile(tile, reps)[:, :h, :w])


def stamp(x: np.ndarray, delta: np.ndarray, mean, std) -> np.ndarray:
    """Normalised NCHW rows with ``delta`` added in pixel space (clipped to [0, 1]); ``delta`` is CHW or NCHW."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    pixels = np.clip(x * s + m + delta, 0.0, 1.0)
    return ((pixels - m) / s).astype(np.float32)


def controls(key: bytes, purpose: str, n: int, shape: tuple[int, int, int]) -> list[np.ndarray]:
    return [trigger(derived_key(key, purpose, i), shape) for i in range(n)]


def stamp_with_controls(x: np.ndarray, patterns: list[np.ndarray], mean, std,
                        positions: np.ndarray | None = None) -> np.ndarray:
    """Row i (at position ``positions[i]``, default i) stamped with pattern position mod len(patterns)."""
    positions = range(len(x)) if positions is None else positions
    deltas = np.stack([patterns[int(i) % len(patterns)] for i in positions])
    return stamp(x, deltas, mean, std)


def log10_binomial_tail(b: int, n: int) -> float:
    """log10 P(X >= b) for X ~ Binomial(n, 1/2) (log space: the tail of a watermarked model underflows floats)."""
    if n == 0 or b <= 0:
        return 0.0
    if b > n:
        return -math.inf
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(b, n + 1)]
    top = max(logs)
    return min(0.0, (top + math.log(sum(math.exp(v - top) for v in logs))) / math.log(10))


def p_text(log10_p: float) -> str:
    """A p-value from its log10, readable below the float range: 3.1e-07, 2.4e-512."""
    if log10_p > -300:
        return f"{10 ** log10_p:.2e}"
    exponent = math.floor(log10_p)
    return f"{10 ** (log10_p - exponent):.1f}e{exponent}"


def ownership_test(key_correct: np.ndarray, control_correct: np.ndarray) -> dict:
    """The exact one-sided McNemar test of the module docstring on paired per-row outcomes."""
    key_correct = np.asarray(key_correct, bool)
    control_correct = np.asarray(control_correct, bool)
    b = int(np.sum(control_correct & ~key_correct))
    c = int(np.sum(~control_correct & key_correct))
    log10_p = log10_binomial_tail(b, b + c)
    key_acc, control_acc = float(key_correct.mean()), float(control_correct.mean())
    effect = 1.0 - key_acc / control_acc if control_acc > 0 else 0.0
    return {"b": b, "c": c, "n": int(len(key_correct)), "log10_p": log10_p, "p_value": p_text(log10_p),
            "effect": effect, "owned": bool(log10_p < math.log10(ALPHA) and effect >= MIN_EFFECT), "alpha": ALPHA,
            "min_effect": MIN_EFFECT}


def measure_ownership(logits, x: np.ndarray, labels: np.ndarray, key: bytes, pre) -> dict:
    """Clean, key-stamped and control-stamped top-1 of a model on labelled normalised rows, and the ownership
    test (compile, ``mapc verify --ownership`` and ``mapc attack --ownership`` alike). ``logits(x)`` runs the
    model: an onnxruntime session over the artifact or an attacked copy of it, or one behind an input
    transform."""
    shape = tuple(x.shape[1:])
    clean = logits(x).argmax(1) == labels
    keyed = logits(stamp(x, trigger(key, shape), pre.mean, pre.std)).argmax(1) == labels
    control = logits(stamp_with_controls(x, controls(key, "verify", VERIFY_CONTROLS, shape),
                                         pre.mean, pre.std)).argmax(1) == labels
    return {"clean_acc": float(clean.mean() * 100), "key_acc": float(keyed.mean() * 100),
            "control_acc": float(control.mean() * 100), **ownership_test(keyed, control)}

"""Image preprocessing shared by mask learning and verification.

Invariant: the same ``Preprocess`` maps the same uint8 images to the same
float32 NCHW tensor everywhere (training, torch parity, onnxruntime), so a
number measured on the artifact is measured on exactly what the mask saw.

    x = (resize(to_channels(img)) / 255 - mean[c]) / std[c]

Grey images are replicated to 3 channels when the model wants 3; colour
images are reduced to luminance (ITU-R 601) when it wants 1. Resizing is
bilinear (Pillow) and only happens when the stored size differs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .errors import UserError


@dataclass(frozen=True)
class Preprocess:
    size: tuple[int, int] = (32, 32)
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        size = self.size
        if isinstance(size, int):
            size = (size, size)
        elif len(size) == 1:
            size = (size[0], size[0])
        object.__setattr__(self, "size", tuple(int(s) for s in size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.size) != 2 or min(self.size) < 1:
            raise UserError(f"preprocess.size must be one or two positive integers, got {self.size}")
        if self.channels not in (1, 3):
            raise UserError(f"preprocess.channels must be 1 or 3, got {self.channels}")
        if len(self.mean) == 1:
            object.__setattr__(self, "mean", self.mean * self.channels)
        if len(self.std) == 1:
            object.__setattr__(self, "std", self.std * self.channels)
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise UserError(f"preprocess.mean and preprocess.std need {self.channels} values "
                            f"(one per channel), got {list(self.mean)} and {list(self.std)}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise UserError(f"preprocess.mean and preprocess.std must be finite numbers, got {list(self.mean)} and "
                            f"{list(self.std)}")
        if any(s <= 0 for s in self.std):
            raise UserError(f"preprocess.std must be positive, got {list(self.std)}")
        if max(self.size) > 4096:
            raise UserError(f"preprocess.size {self.size} is larger than 4096 pixels; pick the model's input size")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 NxHxW or NxHxWxC -> uint8 NxHxWx{channels}."""
    if images.ndim == 3:
        images = images[..., None]
    c = images.shape[-1]
    if c == 4:
        images, c = images[..., :3], 3
    if c == channels:
        return images
    if channels == 3 and c == 1:
        return np.repeat(images, 3, axis=-1)
    if channels == 1 and c == 3:
        grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None]
    raise ValueError(f"cannot convert {c} channels to {channels}")


def resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 NxHxWxC -> uint8 Nx{size}xC, bilinear; a no-op when sizes match."""
    h, w = size
    if images.shape[1:3] == (h, w):
        return images
    out = np.empty((len(images), h, w, images.shape[-1]), np.uint8)
    for i, im in enumerate(images):
        pil = Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)
        arr = np.asarray(pil.resize((w, h), Image.BILINEAR))
        out[i] = arr.reshape(h, w, -1)
    return out


def apply(pre: Preprocess, images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 NCHW normalised model input."""
    x = resize(to_channels(images, pre.channels), pre.size).astype(np.float32) / 255.0
    x = (x - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess_from(d: dict | None, where: str = "preprocess") -> Preprocess:
    """Build a Preprocess from a TOML table or metadata dict; unknown keys and mistyped values are errors."""
    from .typed import typed_fields
    if d is not None and not isinstance(d, dict):
        raise UserError(f"{where}: expected a table of size, channels, mean, std; got {d!r}")
    return Preprocess(**typed_fields(Preprocess, dict(d or {}), where))


__all__ = ["Preprocess", "apply", "preprocess_from", "to_channels", "resize"]

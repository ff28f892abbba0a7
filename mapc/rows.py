"""Rows of a domain, read and preprocessed one batch at a time.

Invariant: ``rows.take(idx)`` is bit for bit ``preprocess.apply(pre, images[rows[idx]])``, whatever
the batch, so a figure does not depend on how rows are grouped; and nothing holds more than one batch
of preprocessed rows, so memory is bounded by the batch size, never by the number of rows. Images
themselves stay where they are: an ``.npz`` domain's uint8 array (memory-mapped when the archive
stores it uncompressed) or an ImageFolder's files, decoded when a batch asks for them. A domain
small enough (``CACHE_BYTES`` of preprocessed rows, 128 MiB) is preprocessed once and kept
(``cached``): a constant bound, and the same values.

A ``Rows`` is numpy-only (onnxruntime measures it without torch). Mask learning wraps it in a torch
``DataLoader`` (``mapc.loader``); derived rows (the watermark's stamped copies, synthesized images,
data-free neighbor shifts) are ``Rows`` too, so the learning loop sees one kind of thing.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from .preprocess import Preprocess, apply


class Rows:
    """``len(rows)`` rows; ``take(idx)`` -> float32 NCHW model input; ``labels`` (int64, or None)."""
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def batches(self, size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self), size):
            yield self.take(np.arange(i, min(i + size, len(self))))

    def subset(self, idx: np.ndarray) -> "Rows":
        return Subset(self, np.asarray(idx, np.int64))

    def materialize(self) -> np.ndarray:
        """Every row at once (only for rows known to be few: validation and probe slices, tests)."""
        return self.take(np.arange(len(self)))


class ImageRows(Rows):
    """Rows ``index`` of uint8 ``images`` (an array, a memory map or a lazy ImageFolder), preprocessed per batch."""

    def __init__(self, images, index: np.ndarray, labels: np.ndarray | None, pre: Preprocess):
        self.images, self.index, self.pre = images, np.asarray(index, np.int64), pre
        self.labels = None if labels is None else np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return apply(self.pre, np.asarray(self.images[self.index[np.asarray(idx, np.int64)]]))


class ArrayRows(Rows):
    """Rows already preprocessed in memory (synthesized images, their shifts, small test tensors)."""

    def __init__(self, x: np.ndarray, labels: np.ndarray | None = None):
        self.x = x
        self.labels = None if labels is None else np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(idx, np.int64)]


class Subset(Rows):
    def __init__(self, base: Rows, idx: np.ndarray):
        self.base, self.idx = base, idx
        self.labels = None if base.labels is None else base.labels[idx]

    def __len__(self) -> int:
        return len(self.idx)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return self.base.take(self.idx[np.asarray(idx, np.int64)])


class Mapped(Rows):
    """``base`` with ``fn(x, positions)`` applied to every batch (the watermark's stamped rows); same labels."""

    def __init__(self, base: Rows, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]):
        self.base, self.fn = base, fn
        self.labels = base.labels

    def __len__(self) -> int:
        return len(self.base)

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        return self.fn(self.base.take(idx), idx)


class Concat(Rows):
    """``a`` then ``b`` (labels concatenated when both have them)."""

    def __init__(self, a: Rows, b: Rows):
        self.a, self.b = a, b
        self.labels = None if a.labels is None or b.labels is None else np.concatenate([a.labels, b.labels])

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        first = idx < len(self.a)
        out = None
        for part, rows, sel in ((self.a, idx[first], first), (self.b, idx[~first] - len(self.a), ~first)):
            if len(rows) == 0:
                continue
            x = part.take(rows)
            if out is None:
                out = np.empty((len(idx), *x.shape[1:]), x.dtype)
            out[sel] = x
        return out


BATCH_BYTES = 16 << 20    # model input per inference batch: large images get fewer rows per batch
CACHE_BYTES = 128 << 20   # a domain whose preprocessed rows fit in this is preprocessed once and kept


def cached(rows: Rows, budget: int = CACHE_BYTES) -> Rows:
    """``rows`` preprocessed once into memory when they fit ``budget`` bytes (the bundled sample's domains do:
    learning then costs no per-step preprocessing), else ``rows`` itself, read a batch at a time. Either way
    memory stays bounded by a constant, and the values are the same bit for bit."""
    if len(rows) == 0:
        return rows
    one = rows.take(np.arange(1))
    if one.nbytes * len(rows) > budget:
        return rows
    return ArrayRows(rows.materialize(), rows.labels)


def rows_per_batch(x, cap: int) -> int:
    """Rows per inference batch: at most ``cap``, and at most ``BATCH_BYTES`` of float32 input (a 3x224x224 row
    is 0.6 MB: 27 rows; the sample's 3x32x32 rows keep the cap). Activation memory scales with it."""
    shape = row_shape(x) if not isinstance(x, tuple) else x
    return int(max(1, min(cap, BATCH_BYTES // max(4 * int(np.prod(shape)), 1))))


def batches_of(x: np.ndarray | Rows, size: int) -> Iterator[np.ndarray]:
    """Consecutive batches of an array or of ``Rows`` (``size`` rows, fewer for large rows: ``rows_per_batch``)."""
    if len(x) == 0:
        return
    size = rows_per_batch(x, size)
    if isinstance(x, Rows):
        yield from x.batches(size)
    else:
        for i in range(0, len(x), size):
            yield x[i:i + size]


def row_shape(x) -> tuple[int, ...]:
    """The shape of one row of an array, a tensor or ``Rows`` (whose first row is read once)."""
    if not isinstance(x, Rows):
        return tuple(x.shape[1:])
    if getattr(x, "_row_shape", None) is None:
        x._row_shape = tuple(x.take(np.arange(min(1, len(x)))).shape[1:])
    return x._row_shape

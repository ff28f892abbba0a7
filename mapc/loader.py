"""Step batches for mask learning, read through a torch ``DataLoader``.

Every learning step takes ``counts[k]`` rows of each row source k (the authorized rows first, then one
source per unauthorized domain). The row indices of all steps are drawn in the main process, from the
learning loop's seeded generator, in that fixed order: the draw does not depend on the number of
loader workers or of processes. Workers (``workers`` > 0) only read files and preprocess; batches
arrive in step order, in pinned memory when learning runs on CUDA.

With several processes (``torch.distributed``, one ``Shard`` per rank) every rank draws the same global
step and reads only its contiguous share of each sharded source's rows, so W processes read each row
once and together see exactly the rows one process would.

Translation jitter (``jitter[k]`` = j > 0 pixels): each row of source k is shifted by (dy, dx), drawn
uniformly from [-j, j]^2 with the indices (same generator, right after them), the uncovered border filled
by replicating the edge pixels. With j = 0 nothing is drawn and the index sequence is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import UserError
from .rows import Rows


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` data-parallel processes."""
    rank: int = 0
    world: int = 1

    def part(self, n: int) -> slice:
        """The contiguous share of ``n`` rows (``n`` divisible by ``world``) this rank reads."""
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)


def translated(x: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (N x C x H x W) moved by ``shifts`` (N x 2 integer (dy, dx), |d| < H, W): the content
    moves by (dy, dx) pixels and the uncovered border repeats the edge pixels."""
    j = int(np.abs(shifts).max()) if len(shifts) else 0
    if j == 0:
        return x
    h, w = x.shape[-2:]
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(j, j), (j, j)], mode="edge")
    return np.stack([padded[i, ..., j - dy: j - dy + h, j - dx: j - dx + w] for i, (dy, dx) in enumerate(shifts)])


class StepPlans:
    """Per step and source: an index array ``rng.integers(0, len(source), count)``, then with jitter j > 0
    the rows' shifts ``rng.integers(-j, j + 1, (count, 2))`` (else None)."""

    def __init__(self, sizes: list[int], counts: list[int], steps: int, rng: np.random.Generator,
                 jitter: list[int] | None = None):
        self.sizes, self.counts, self.steps, self.rng = sizes, counts, steps, rng
        self.jitter = jitter or [0] * len(sizes)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            plan = []
            for n, c, j in zip(self.sizes, self.counts, self.jitter):
                idx = self.rng.integers(0, n, c)
                plan.append((idx, self.rng.integers(-j, j + 1, (c, 2)) if j > 0 else None))
            yield [tuple(plan)]


class StepRows(Dataset):
    """``dataset[plan]`` -> per source (x float32 tensor, labels tensor or None) of this rank's rows."""

    def __init__(self, sources: list[Rows], sharded: list[bool], shard: Shard):
        self.sources, self.sharded, self.shard = sources, sharded, shard

    def __len__(self) -> int:
        return 0   # indexed only by plans

    def __getitem__(self, plan):
        out = []
        try:
            for src, (idx, shifts), sharded in zip(self.sources, plan, self.sharded):
                if sharded:
                    mine = self.shard.part(len(idx))
                    idx, shifts = idx[mine], None if shifts is None else shifts[mine]
                y = None if src.labels is None else torch.from_numpy(src.labels[idx])
                x = src.take(idx)
                out.append((torch.from_numpy(x if shifts is None else translated(x, shifts)), y))
        except UserError as e:     # e.g. a file broken past its header: one line, not a worker's traceback
            return StepError(str(e))
        return out


@dataclass(frozen=True)
class StepError:
    """A bad-input error met while reading a step's rows (in a worker or not); the loop raises it."""
    message: str

    def raise_(self):
        raise UserError(self.message)


def _first(batch):
    return batch[0]


def step_loader(sources: list[Rows], counts: list[int], steps: int, rng: np.random.Generator,
                device: torch.device, workers: int = 0, shard: Shard = Shard(),
                sharded: list[bool] | None = None, jitter: list[int] | None = None) -> DataLoader:
    """Batches for ``steps`` learning steps (see the module docstring); ``sharded[k]`` False: every rank reads
    all of source k's rows (the hard-row candidates, selected before they are shared out); ``jitter[k]``:
    source k's translation jitter in pixels (0: none)."""
    sharded = [True] * len(sources) if sharded is None else sharded
    return DataLoader(StepRows(sources, sharded, shard),
                      batch_sampler=StepPlans([len(s) for s in sources], counts, steps, rng, jitter),
                      collate_fn=_first, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, prefetch_factor=4 if workers else None)

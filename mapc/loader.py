"""Step batches for mask learning, read through a torch ``DataLoader``.

Every learning step takes ``counts[k]`` rows of each row source k (the authorized rows first, then one
source per unauthorized domain). The row indices of all steps are drawn in the main process, from the
learning loop's seeded generator, in that fixed order: the draw does not depend on the number of
loader workers or of processes. Workers (``workers`` > 0) only read files and preprocess; batches
arrive in step order, in pinned memory when learning runs on CUDA.

With several processes (``torch.distributed``, one ``Shard`` per rank) every rank draws the same global
step and reads only its contiguous share of each sharded source's rows, so W processes read each row
once and together see exactly the rows one process would.
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


class StepPlans:
    """Per step: one index array per source, drawn as ``rng.integers(0, len(source), count)``."""

    def __init__(self, sizes: list[int], counts: list[int], steps: int, rng: np.random.Generator):
        self.sizes, self.counts, self.steps, self.rng = sizes, counts, steps, rng

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield [tuple(self.rng.integers(0, n, c) for n, c in zip(self.sizes, self.counts))]


class StepRows(Dataset):
    """``dataset[plan]`` -> per source (x float32 tensor, labels tensor or None) of this rank's rows."""

    def __init__(self, sources: list[Rows], sharded: list[bool], shard: Shard):
        self.sources, self.sharded, self.shard = sources, sharded, shard

    def __len__(self) -> int:
        return 0   # indexed only by plans

    def __getitem__(self, plan):
        out = []
        try:
            for src, idx, sharded in zip(self.sources, plan, self.sharded):
                if sharded:
                    idx = idx[self.shard.part(len(idx))]
                y = None if src.labels is None else torch.from_numpy(src.labels[idx])
                out.append((torch.from_numpy(src.take(idx)), y))
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
                sharded: list[bool] | None = None) -> DataLoader:
    """Batches for ``steps`` learning steps (see the module docstring); ``sharded[k]`` False: every rank reads
    all of source k's rows (the hard-row candidates, selected before they are shared out)."""
    sharded = [True] * len(sources) if sharded is None else sharded
    return DataLoader(StepRows(sources, sharded, shard),
                      batch_sampler=StepPlans([len(s) for s in sources], counts, steps, rng),
                      collate_fn=_first, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, prefetch_factor=4 if workers else None)

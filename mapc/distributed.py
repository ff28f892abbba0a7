"""Data-parallel mask learning across processes (torch.distributed; ``torchrun`` or ``--nproc`` starts them).

Invariant: every rank holds the same scores, hence the same mask. Each step all ranks draw the same
global batch (``mapc.loader``), run the masked model on their own share of its rows, gather the logits
(and the frozen model's outputs) in the global row order, evaluate the one loss on the global batch
identically, backpropagate it only through their own rows, and sum the score gradients (all-reduce):

    dL/dS = sum_r  dL/dz_r . dz_r/dS        (z_r: rank r's rows of the global logits z)

which is the single-process gradient up to the order of that sum. The in-batch probe and the
per-domain weights need the whole batch, which is why logits are gathered rather than per-rank
losses averaged. Only rank 0 exports, runs the passes, measures and writes OUTDIR.

Backends: gloo on CPU, nccl on CUDA. The launcher's rendezvous (``MASTER_ADDR``, ``RANK``, ...) is
torch.distributed's own protocol, read by ``init_process_group``; mapc reads no setting of its own
from the environment.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather_segments(self, local: torch.Tensor, shares: list[int]) -> torch.Tensor:
        """``local`` = this rank's rows of each segment, concatenated (``shares[k]`` rows of segment k) -> the
        global tensor: segment k = every rank's share of it in rank order, segments in order."""
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous())
        out, start = [], 0
        for n in shares:
            out.extend(p[start:start + n] for p in parts)
            start += n
        return torch.cat(out)

    def local_part(self, global_t: torch.Tensor, shares: list[int]) -> torch.Tensor:
        """This rank's rows of a global tensor laid out as ``gather_segments`` returns it."""
        out, start = [], 0
        for n in shares:
            out.append(global_t[start + self.rank * n:start + (self.rank + 1) * n])
            start += n * self.world
        return torch.cat(out)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` (any number of rows each), in rank order."""
        parts = [None] * self.world
        dist.all_gather_object(parts, t.cpu())
        return torch.cat(parts).to(t.device)

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def broadcast_(self, t: torch.Tensor) -> None:
        """Rank 0's ``t`` into every rank's ``t`` (in place)."""
        dist.broadcast(t, src=0)

    def barrier(self) -> None:
        dist.barrier()


def check_batch_split(batch_size: int, world: int) -> None:
    """Every process reads an equal share of each batch."""
    from .errors import UserError
    if batch_size % world:
        raise UserError(f"mask.batch_size {batch_size} must be divisible by the number of processes ({world}): each "
                        f"reads an equal share of every batch")


def launched() -> bool:
    """True inside a process started by torchrun or ``mapc.launch`` (the rendezvous variables are set)."""
    import os
    return dist.is_available() and "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device) -> Dist | None:
    """Join the launcher's process group (once); None when running as a single process."""
    if not launched():
        return None
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.get_world_size() == 1:
        return None
    return Dist(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    """Tear the group down once every rank is here: no collective is in flight on either side."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_helper() -> None:
    """End a helper process (rank > 0) after ``shutdown``: it has written nothing and has nothing to write.

    It leaves without the interpreter's finalization, where gloo's C++ worker threads may still be torn
    down and abort the process ("terminate called without an active exception", SIGABRT; seen once in
    eight two-process compiles on a 2-core CPU, none in twenty after this change), which the launcher
    must read as a failure."""
    import os
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

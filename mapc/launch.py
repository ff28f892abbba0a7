"""``mapc compile --nproc N``: the same command in N data-parallel processes (``mapc.distributed``).

Starts ``python -m mapc ARGS`` N times (ARGS: the command line without ``--nproc``) with the
rendezvous variables torch.distributed reads (``MASTER_ADDR`` 127.0.0.1, a free ``MASTER_PORT``,
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), as ``torchrun --standalone --nproc_per_node N`` would, and
exits with rank 0's code, so 0 / 1 / 2 keep their meaning (torchrun reports every failure as 1).
Rank 0 prints the report; the other ranks print nothing unless they fail, and when one process
fails the others are stopped. ``torchrun --nproc_per_node N -m mapc compile ...`` works too.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def check_nproc(nproc: int, cfg) -> None:
    """Refuse before any process starts what every process would refuse later."""
    from .distributed import check_batch_split
    from .errors import UserError
    check_batch_split(cfg.mask.batch_size, nproc)
    if cfg.device == "cuda":
        import torch
        if torch.cuda.device_count() < nproc:
            raise UserError(f"--nproc {nproc} with --device cuda: only {torch.cuda.device_count()} GPU(s) here, one "
                            f"process per GPU; lower --nproc")


def run(nproc: int, argv: list[str]) -> int:
    """Run ``mapc ARGV`` (without ``--nproc``) in ``nproc`` processes; rank 0's exit code."""
    args = [sys.executable, "-m", "mapc", *without_nproc(argv)]
    port = free_port()
    procs, logs = [], []
    for rank in range(nproc):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
        if rank == 0:
            procs.append(subprocess.Popen(args, env=env))
        else:
            log = tempfile.TemporaryFile()
            logs.append(log)
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log))
    try:
        return _wait(procs, logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def _wait(procs, logs) -> int:
    while True:
        codes = [p.poll() for p in procs]
        if codes[0] is not None and (codes[0] != 0 or all(c is not None for c in codes[1:])):
            if codes[0] < 0:     # killed by a signal: not a gate verdict
                sys.stderr.write(f"mapc: error: process 0 was killed by signal {-codes[0]}; nothing was written\n")
                return 2
            return codes[0]
        failed = [r for r, c in enumerate(codes[1:], 1) if c not in (None, 0)]
        if failed and codes[0] is None:     # a helper process died: rank 0 would wait for it forever
            r = failed[0]
            logs[r - 1].seek(0)
            sys.stderr.write(logs[r - 1].read().decode(errors="replace"))
            return codes[r] if codes[r] > 0 else 2
        time.sleep(0.2)

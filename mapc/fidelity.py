"""Student fidelity: how much of the frozen model's function a synthesized set carries.

The standard check of model inversion (data-free knowledge distillation): a
fresh model of the same architecture is trained only on the synthesized
images, to match the frozen model's softened predictions on them,

    L(theta) = T^2 * KL( softmax(f_s(x) / T) || softmax(f_theta(x) / T) ),   x ~ synthesized set
                                                                             (random translation by +-2 px)

and is then measured on real labelled rows of the authorized domain. No real
row is seen while training. If the student is far below the frozen model, no
mask learned from that set can be expected to keep the authorized domain.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .masking import predict


@dataclass
class Fidelity:
    student_acc: float      # % of the real rows the student classifies correctly
    teacher_acc: float      # % for the frozen model on the same rows
    images: int
    steps: int
    seconds: float


def student_fidelity(make_student: Callable[[], torch.nn.Module], teacher: torch.nn.Module,
                     images: torch.Tensor, real_x: torch.Tensor, real_y: torch.Tensor, steps: int = 1500,
                     batch: int = 128, temperature: float = 4.0, lr: float = 3e-3, jitter: int = 2,
                     seed: int = 0) -> Fidelity:
    """Distil ``teacher`` (in inference mode, as loaded) into ``make_student()`` on ``images`` alone;
    measure both on (real_x, real_y)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = make_student()
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=lr / 3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    t0 = time.perf_counter()
    for _ in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        if jitter:
            dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
            x = torch.roll(x, (dy, dx), (2, 3))
        with torch.no_grad():
            target = F.log_softmax(teacher(x) / temperature, 1)
        loss = F.kl_div(F.log_softmax(student(x) / temperature, 1), target, reduction="batchmean",
                        log_target=True) * temperature ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    student.eval()

    def acc(m):
        return float((predict(m, real_x).argmax(1) == real_y).float().mean() * 100)

    return Fidelity(acc(student), acc(teacher), len(images), steps, time.perf_counter() - t0)

"""Pseudo-authorized data by model inversion, and synthetic neighbor domains.

Model inversion (DeepInversion-style): optimise a batch of inputs x, one
target class y_i per image, so that the frozen model f_s (eval mode) sees
its own training statistics:

    L(x) = CE(f_s(x), y) + a_bn * sum_l ( ||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2 )
                         + a_tv * TV(x) + a_l2 * ||x||^2

where mu_l, var_l are the running mean/variance stored in BatchNorm layer l
and mu_l(x), var_l(x) the per-channel statistics of that layer's input over
the batch. Invariant: the model's weights and buffers are never changed;
only x is optimised. Models without BatchNorm statistics are refused (the
BN term is the prior that makes inversions look like the training data;
without it CE alone yields adversarial noise).

Neighbor domains for the data-free mode are class-preserving shifts of the
synthetic images: colour/contrast changes, inversion, blur, noise, and
textured backgrounds from random smooth fields; they stand in for unknown
unauthorized domains.

BatchNorm inputs are captured by ``mapc.taps.BatchNormTap`` (forward hooks for
plain modules, an instrumented FX graph for torch.export programs, restored
afterwards); TorchScript archives expose neither and are refused for these modes.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SynthesisConfig
from .errors import UserError
from .taps import BatchNormTap


class BNProbe:
    """The BatchNorm-statistics prior of inversion, over a ``taps.BatchNormTap`` on the model itself
    (instrumented while the probe is open, exactly restored by ``close``)."""

    def __init__(self, module: nn.Module, model_format: str):
        if model_format == "torchscript":
            raise UserError("--mode source-free/data-free synthesizes data from BatchNorm statistics, which a "
                            "TorchScript archive does not expose; pass the model as .pt2 or state_dict + --arch")
        self.module = module
        self.tap = BatchNormTap(module).__enter__()
        if not self.tap.found:
            self.tap.__exit__(None, None, None)
            raise UserError("--mode source-free/data-free needs BatchNorm running statistics to synthesize "
                            "authorized-like data, and this model has none; use --mode source-available with real data")

    def loss(self, first_weight: float = 1.0) -> torch.Tensor:
        total = 0.0
        for i, (x, mean, var) in enumerate(self.tap.records):
            dims = [0] + list(range(2, x.ndim))
            mu = x.mean(dims)
            v = x.var(dims, unbiased=False)
            total = total + (first_weight if i == 0 else 1.0) * (torch.norm(mu - mean, 2) + torch.norm(v - var, 2))
        return total

    def close(self) -> None:
        self.tap.__exit__(None, None, None)

    def count(self) -> int:
        return len(self.tap.records)

    def clear(self) -> None:
        self.tap.take()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def bn_mismatch(probe: BNProbe, x: torch.Tensor) -> float:
    """Mean BN-statistics distance of a batch: lower means closer to the training data."""
    probe.clear()
    with torch.no_grad():
        probe.module(x)
        value = float(probe.loss()) / max(probe.count(), 1)
    probe.clear()
    return value


def invert(module: nn.Module, model_format: str, input_shape: tuple[int, int, int], num_classes: int,
           cfg: SynthesisConfig, seed: int, device: torch.device, progress: bool = True):
    """Synthesize ``cfg.images`` normalised NCHW inputs with balanced class targets.

    Returns (images, target labels, stats) where stats holds the BN-statistics
    mismatch of synthetic images and of Gaussian noise (lower is closer).
    """
    from tqdm import tqdm

    g = torch.Generator(device="cpu").manual_seed(seed)
    probe = BNProbe(module, model_format)
    try:
        return _invert(probe, module, input_shape, num_classes, cfg, g, device, progress, tqdm)
    finally:
        probe.close()


def _invert(probe: "BNProbe", module: nn.Module, input_shape, num_classes: int, cfg: SynthesisConfig,
            g: torch.Generator, device: torch.device, progress: bool, tqdm):
    for p in module.parameters():
        p.requires_grad_(False)
    labels = torch.arange(cfg.images) % num_classes
    labels = labels[torch.randperm(cfg.images, generator=g)]
    out = []
    t0 = time.perf_counter()
    n_batches = (cfg.images + cfg.batch - 1) // cfg.batch
    bar = tqdm(total=n_batches * cfg.steps, desc="synthesize", file=sys.stderr, disable=not progress, leave=False,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for b in range(n_batches):
        y = labels[b * cfg.batch:(b + 1) * cfg.batch].to(device)
        x = (cfg.init_std * torch.randn(len(y), *input_shape, generator=g)).to(device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
        for _ in range(cfg.steps):
            probe.clear()
            xin = x
            if cfg.jitter > 0:
                dy, dx = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,), generator=g))
                xin = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            logits = probe.module(xin)
            loss = (F.cross_entropy(logits, y) + cfg.bn_weight * probe.loss(cfg.first_bn_weight)
                    + cfg.tv_weight * total_variation(x) + cfg.l2_weight * x.pow(2).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        out.append(x.detach())
    bar.close()
    images = torch.cat(out)
    k = min(len(images), 256)
    stats = {"bn_mismatch_synthetic": bn_mismatch(probe, images[:k]),
             "bn_mismatch_noise": bn_mismatch(probe, torch.randn(images[:k].shape, generator=g).to(device)),
             "seconds": time.perf_counter() - t0, "images": int(len(images)), "steps": cfg.steps}
    return images, labels.to(device), stats


def _mean_std(x: torch.Tensor, pre_mean, pre_std) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(pre_mean, device=x.device).view(1, -1, 1, 1),
            torch.tensor(pre_std, device=x.device).view(1, -1, 1, 1))


def to_pixels(x: torch.Tensor, pre_mean, pre_std) -> torch.Tensor:
    """Normalised model input back to [0, 1] pixels (the inverse of preprocessing, clamped)."""
    mean, std = _mean_std(x, pre_mean, pre_std)
    return (x * std + mean).clamp(0, 1)


def to_uint8_images(x: torch.Tensor, pre) -> np.ndarray:
    """Normalised NCHW input -> uint8 NxHxWxC (NxHxW for one channel), e.g. for the report's image grid."""
    pix = (to_pixels(x.cpu(), pre.mean, pre.std) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return pix[..., 0] if pix.shape[-1] == 1 else pix


def neighbor_domains(x: torch.Tensor, seed: int, pre_mean: tuple[float, ...], pre_std: tuple[float, ...]) -> list[torch.Tensor]:
    """Class-preserving shifts of synthetic images (normalised space in, normalised space out)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mean, std = _mean_std(x, pre_mean, pre_std)
    pix = to_pixels(x, pre_mean, pre_std)
    n, c, h, w = pix.shape

    def rand(*shape):
        return torch.rand(*shape, generator=g).to(x.device)

    def smooth_field(channels):
        coarse = rand(n, channels, max(2, h // 8), max(2, w // 8))
        return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)

    colour = (pix * (0.3 + 0.7 * rand(n, c, 1, 1)) + 0.5 * rand(n, c, 1, 1)).clamp(0, 1)
    inverted = 1 - pix
    blurred = F.avg_pool2d(F.pad(pix, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    noisy = (pix + 0.25 * torch.randn(pix.shape, generator=g).to(x.device)).clamp(0, 1)
    texture = smooth_field(c)
    textured = (texture - pix).abs()                         # MNIST-M-like blend with a random field
    shifts = [colour, inverted, blurred, noisy, textured]
    return [(s - mean) / std for s in shifts]



"""Pseudo-authorized data by model inversion, and synthetic neighbor domains.

Model inversion: produce inputs x, one target class y_i per image, so that the frozen model f_s (eval mode) sees
its own training statistics:

    L(x) = CE(f_s(x), y) + a_bn * sum_l ( ||mu_l(x) - mu_l||_2 + ||var_l(x) - var_l||_2 )
                         + a_chroma * ||x - mean_c(x)||^2  [+ a_tv * TV(x) + a_l2 * ||x||^2]

where mu_l, var_l are the running mean/variance stored in BatchNorm layer l
and mu_l(x), var_l(x) the per-channel statistics of that layer's input over
the batch. Invariant: the model's weights and buffers are never changed;
only x (or the generator that produces it) is optimised. Models without BatchNorm statistics are refused (the
BN term is the prior that makes inversions look like the training data;
without it CE alone yields adversarial noise).

Two ways to produce x (``SynthesisConfig.method``):
  - "generator" (default): a small class-conditional generator G(z, y) is
    trained with the loss above on its own samples (G's convolutions are the
    smoothness prior, so no TV term); then ``images`` samples are drawn with
    balanced classes. With ``generators`` = k, k generators are trained one after the other, each from
    its own initialisation, and each draws ``images`` (the first is the one a single-generator synthesis
    trains); on the sample two did not give source-free margin (samples/README.md, "Two generators").
    Its images are strokes on a plain background for a model
    trained on digits, where per-image optimisation gives high-frequency
    texture; measured on the plain sample model, a student distilled on them
    alone reaches 97.9-98.5 % on real mnist over seeds 0-2 (97.5 % for "pixels", seed 0) and the
    source-free mask keeps far more of the real authorized domain
    (samples/README.md, "Synthesis: what was tried").
  - "pixels": DeepInversion-style per-image optimisation of each batch.
Both add a colour prior, ``chroma_weight`` * mean_pixels ||x - mean_c(x)||^2:
among inputs that explain the statistics equally well, prefer grey ones; a
model trained on colour still gets colour from the BN term.

Neighbor domains for the data-free mode are class-preserving shifts of the
synthetic images, one domain per kind: colour/contrast changes, inversion, blur, noise, textured
backgrounds from random smooth fields, a low-resolution sensor (average-pooled
by 4 and upsampled) and bold strokes (dilation); they stand in for unknown
unauthorized domains. Each row is shifted at a random strength a in [``neighbor_min_strength``, 1]
(x + a (shift(x) - x)) and, with probability ``neighbor_compose``, shifted again by another kind, drawn
afresh for every row a step reads (``NeighborRows``). At full strength only, the mask learned to break
far shifts and kept whatever lay between them and the authorized domain: real uci, closer to the model's
training statistics than any full-strength shift, kept 44.9-56.2 % at seeds 0, 1 and 6 (one machine).
Shifts from a tenth of the way on, half of them composed, put neighbors between the two; measured in
samples/README.md ("Neighbors at every strength").

Feasibility (``separability``): an unauthorized domain whose BN statistics
are as close to the model's training statistics as its training data's are
(below ``INSIDE_FRACTION`` of Gaussian noise's mismatch) is indistinguishable
from the training distribution for this model; source-free or data-free
protection cannot separate it, and the compile says so.

BatchNorm inputs are captured by ``mapc.taps.BatchNormTap`` (forward hooks for
plain modules, an instrumented FX graph for torch.export programs, restored
afterwards); TorchScript archives expose neither and are refused for these modes.
"""
from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SynthesisConfig
from .errors import UserError
from .rows import ArrayRows, Rows
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
           cfg: SynthesisConfig, seed: int, device: torch.device, pre_mean, pre_std, progress: bool = True):
    """Synthesize ``cfg.images`` normalised NCHW inputs with balanced class targets (per generator: with
    ``cfg.generators`` = k the generator method returns k x ``cfg.images``, each generator's in turn).

    Returns (images, target labels, stats) where stats holds the method, the
    BN-statistics mismatch of the synthetic images and of Gaussian noise (lower is
    closer) and the time taken.
    """
    from tqdm import tqdm

    cfg = cfg.resolved()
    g = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    probe = BNProbe(module, model_format)
    for p in module.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    try:
        bar = tqdm(total=_total_steps(cfg), desc="synthesize", file=sys.stderr, disable=not progress, leave=False,
                   mininterval=0.5 if sys.stderr.isatty() else 10.0)
        if cfg.method == "generator":
            parts = [_by_generator(probe, input_shape, num_classes, cfg, pre_mean, pre_std, g, device, bar)
                     for _ in range(cfg.generators)]
            images, labels = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
        else:
            images, labels = _by_pixels(probe, input_shape, num_classes, cfg, g, device, bar)
        bar.close()
        stats = {"method": cfg.method, "images": int(len(images)), "steps": cfg.steps,
                 "generators": cfg.generators if cfg.method == "generator" else 0,
                 "bn_mismatch_synthetic": bn_mismatch(probe, spread(images, REFERENCE_ROWS)),
                 "bn_mismatch_noise": noise_mismatch(probe, images.shape[1:], device),
                 "seconds": time.perf_counter() - t0}
    finally:
        probe.close()
    return images, labels, stats


def spread(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` rows of ``x`` taken at an even stride, so that every generator's images are among them."""
    return x[::max(1, len(x) // n)][:n]


def _total_steps(cfg: SynthesisConfig) -> int:
    if cfg.method == "generator":
        return cfg.steps * cfg.generators
    return cfg.steps * ((cfg.images + cfg.batch - 1) // cfg.batch)


def balanced_labels(n: int, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """``n`` class targets, every class as often as possible, in a random order."""
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]


def _jittered(x: torch.Tensor, jitter: int, g: torch.Generator) -> torch.Tensor:
    if jitter <= 0:
        return x
    dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=g))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def chroma(x: torch.Tensor) -> torch.Tensor:
    """Mean squared deviation of each channel from the per-pixel channel mean (0 for grey images)."""
    return (x - x.mean(1, keepdim=True)).pow(2).mean()


def inversion_loss(probe: BNProbe, x: torch.Tensor, y: torch.Tensor, cfg: SynthesisConfig,
                   g: torch.Generator) -> torch.Tensor:
    """CE to the target classes + BN-statistics prior + colour prior, on a randomly translated batch."""
    probe.clear()
    logits = probe.module(_jittered(x, cfg.jitter, g))
    return (F.cross_entropy(logits, y) + cfg.bn_weight * probe.loss(cfg.first_bn_weight)
            + cfg.chroma_weight * chroma(x))


class ConditionalGenerator(nn.Module):
    """z (64) and a class y -> an image in [0, 1]: z * embed(y) -> linear -> two (upsample, conv, BN,
    LeakyReLU) stages -> conv -> sigmoid, resized to the input size when it is not a multiple of 4."""

    NZ = 64

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int], width: int):
        super().__init__()
        c, h, w = input_shape
        self.size, self.h0, self.w0, self.width = (h, w), max(1, -(-h // 4)), max(1, -(-w // 4)), width
        self.embed = nn.Embedding(num_classes, self.NZ)
        self.project = nn.Linear(self.NZ, width * self.h0 * self.w0)

        def up(cin, cout):
            return [nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                    nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(nn.BatchNorm2d(width), *up(width, width), *up(width, max(width // 2, 4)),
                                  nn.Conv2d(max(width // 2, 4), c, 3, padding=1))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.project(z * self.embed(y)).view(len(z), self.width, self.h0, self.w0)
        x = self.body(h)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def _by_generator(probe, input_shape, num_classes, cfg, pre_mean, pre_std, g, device, bar):
    """Train a conditional generator against the frozen model (its weights never change), then sample
    ``cfg.images`` images with balanced classes. Each call starts from a fresh initialisation drawn from the
    running random state, so several calls give independent generators."""
    mean, std = _mean_std(torch.empty(0, device=device), pre_mean, pre_std)

    def normalise(pix):
        return (pix - mean) / std

    gen = ConditionalGenerator(num_classes, input_shape, cfg.width).to(device)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    gen.train()
    for _ in range(cfg.steps):
        z = torch.randn(cfg.batch, gen.NZ, generator=g).to(device)
        y = torch.randint(0, num_classes, (cfg.batch,), generator=g).to(device)
        loss = inversion_loss(probe, normalise(gen(z, y)), y, cfg, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
    gen.eval()
    labels = balanced_labels(cfg.images, num_classes, g).to(device)
    z = torch.randn(cfg.images, gen.NZ, generator=g).to(device)
    with torch.no_grad():
        images = torch.cat([normalise(gen(z[i:i + 256], labels[i:i + 256]))
                            for i in range(0, cfg.images, 256)])
    return images, labels


def _by_pixels(probe, input_shape, num_classes, cfg, g, device, bar):
    """Per-image optimisation (DeepInversion): each batch of normalised inputs is optimised directly,
    with total-variation and L2 priors."""
    labels = balanced_labels(cfg.images, num_classes, g)
    out = []
    for b in range(0, cfg.images, cfg.batch):
        y = labels[b:b + cfg.batch].to(device)
        x = (cfg.init_std * torch.randn(len(y), *input_shape, generator=g)).to(device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
        for _ in range(cfg.steps):
            loss = (inversion_loss(probe, x, y, cfg, g) + cfg.tv_weight * total_variation(x)
                    + cfg.l2_weight * x.pow(2).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        out.append(x.detach())
    return torch.cat(out), labels.to(device)


# A domain whose BN-statistics mismatch is below this fraction of Gaussian noise's is treated as inside the
# model's training distribution. Calibration on the samples (256 rows): through the colour-trained model,
# mnistm (coloured digits, inside its training augmentation) sits at 0.039 of noise, uci and syn at 0.077
# and 0.071; through the plain (grey-trained) model, uci at 0.14, mnistm at 0.36, syn at 0.49. The noise reference
# does not depend on the synthesis, whose own mismatch moves with the seed (0.23-0.41 on the plain model).
INSIDE_FRACTION = 0.05
REFERENCE_ROWS = 256     # rows each BN-statistics mismatch is measured on (synthesized, noise, each domain)


def noise_mismatch(probe: BNProbe, row_shape, device) -> float:
    """The BN-statistics mismatch of ``REFERENCE_ROWS`` rows of standard Gaussian noise (fixed seed): the
    far end of the scale every other mismatch is read against."""
    noise = torch.randn(REFERENCE_ROWS, *row_shape, generator=torch.Generator().manual_seed(0))
    return bn_mismatch(probe, noise.to(device))


def separability(module: nn.Module, model_format: str, domains: dict[str, torch.Tensor],
                 synthesis_stats: dict) -> dict[str, dict]:
    """Per unauthorized domain: its BN-statistics mismatch (first ``REFERENCE_ROWS`` rows), with the
    synthesized set's and Gaussian noise's (from ``invert``'s stats) beside it. A domain closer to the
    model's training statistics than ``INSIDE_FRACTION`` of the noise's distance is, as far as the model
    can tell, inside its training distribution: a mask learned from synthesized data cannot separate it
    (``separable`` false)."""
    ref, noise = synthesis_stats["bn_mismatch_synthetic"], synthesis_stats["bn_mismatch_noise"]
    probe = BNProbe(module, model_format)
    try:
        out = {}
        for name, x in domains.items():
            v = bn_mismatch(probe, x[:REFERENCE_ROWS])
            out[name] = {"bn_mismatch": v, "bn_mismatch_synthetic": ref, "bn_mismatch_noise": noise,
                         "of_noise": v / max(noise, 1e-12), "separable": v > INSIDE_FRACTION * noise}
        return out
    finally:
        probe.close()


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


NEIGHBOR_KINDS = ("colour", "inverted", "blurred", "noisy", "textured", "low", "bold")
NEIGHBOR_VARIANTS = 32   # independent draws each synthesized row has in a training neighbor domain


def _hashed_uniform(keys: np.ndarray) -> np.ndarray:
    """splitmix64 of integer keys, as floats in [0, 1): a pure function of the key, on every machine."""
    z = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class _Draws:
    """Uniform and normal numbers for rows ``keys``: the j-th number of row k is a pure function of
    (seed, salt, k, j)."""
    PER_ROW = 1 << 24          # numbers one row may draw, over all its streams

    def __init__(self, keys: np.ndarray, seed: int, salt: int = 0):
        mix = (seed * 0xD1B54A32D192ED03 ^ salt * 0xA0761D6478BD642F) % (1 << 64)
        self.base = np.asarray(keys, np.uint64) * np.uint64(self.PER_ROW) ^ np.uint64(mix)
        self.used = 0

    def uniform(self, *shape: int) -> torch.Tensor:
        count = int(np.prod(shape)) if shape else 1
        keys = self.base[:, None] + np.arange(self.used, self.used + count, dtype=np.uint64)[None, :]
        self.used += count
        return torch.from_numpy(_hashed_uniform(keys).astype(np.float32)).view(len(self.base), *shape)

    def normal(self, *shape: int) -> torch.Tensor:
        u1, u2 = self.uniform(*shape).clamp(min=1e-7), self.uniform(*shape)
        return (-2 * u1.log()).sqrt() * torch.cos(2 * math.pi * u2)


def shift_pixels(pix: torch.Tensor, kind: str, draws: _Draws) -> torch.Tensor:
    """One class-preserving shift of [0, 1] pixels at full strength (its random parts from ``draws``)."""
    n, c, h, w = pix.shape
    if kind == "colour":
        return (pix * (0.3 + 0.7 * draws.uniform(c, 1, 1)) + 0.5 * draws.uniform(c, 1, 1)).clamp(0, 1)
    if kind == "inverted":
        return 1 - pix
    if kind == "blurred":
        return F.avg_pool2d(F.pad(pix, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    if kind == "noisy":
        return (pix + 0.25 * draws.normal(c, h, w)).clamp(0, 1)
    if kind == "textured":                                   # MNIST-M-like blend with a random smooth field
        coarse = draws.uniform(c, max(2, h // 8), max(2, w // 8))
        return (F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) - pix).abs()
    if kind == "low":                                        # a low-resolution sensor
        return F.interpolate(F.adaptive_avg_pool2d(pix, (max(2, h // 4), max(2, w // 4))), size=(h, w),
                             mode="bicubic", align_corners=False).clamp(0, 1)
    if kind == "bold":                                       # thicker strokes / dilated shapes
        return F.max_pool2d(pix, 3, stride=1, padding=1)
    raise ValueError(f"unknown neighbor shift {kind!r}")


class NeighborRows(Rows):
    """One synthesized neighbor domain over ``base`` (normalised synthesized rows): row i is base row
    i mod N, shifted by ``NEIGHBOR_KINDS[kind]`` at strength a (the image moved a of the way to its
    shifted self) and, with probability ``compose``, then by another kind at its own strength b; a, b
    uniform in [min_strength, 1]. Every random number of row i is a pure function of (seed, kind, i) (the
    second shift's: of (seed, its kind, i), so two domains composed with the same kind share them), so
    a row reads the same in any batch, worker or process, and ``variants`` draws per base row (i up to
    N * variants) give a training domain that rarely repeats a row. Labels: the base rows' (the shifts
    keep the class content)."""

    def __init__(self, base: Rows, kind: int, seed: int, min_strength: float, compose: float,
                 pre_mean, pre_std, variants: int = NEIGHBOR_VARIANTS):
        c, h, w = base.take(np.arange(1)).shape[1:]
        if 2 * c * h * w + 3 > _Draws.PER_ROW:   # a row's most numbers: strength, noise (2 per value), picks
            raise UserError(f"--mode data-free: the neighbor shifts draw at most {_Draws.PER_ROW} random numbers "
                            f"per image and a {c}x{h}x{w} input needs {2 * c * h * w + 3}; use a smaller input size "
                            f"or give unauthorized data (--mode source-free)")
        self.base, self.kind, self.seed, self.variants = base, kind, seed, variants
        self.min_strength, self.compose, self.pre_mean, self.pre_std = min_strength, compose, pre_mean, pre_std
        self.labels = None if base.labels is None else np.tile(base.labels, variants)

    def __len__(self) -> int:
        return len(self.base) * self.variants

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, np.int64)
        x = torch.from_numpy(np.ascontiguousarray(self.base.take(idx % len(self.base))))
        draws = _Draws(idx * len(NEIGHBOR_KINDS) + self.kind, self.seed)
        pix = to_pixels(x, self.pre_mean, self.pre_std)
        pix = self.blend(pix, NEIGHBOR_KINDS[self.kind], draws)
        if self.compose > 0:
            step = (draws.uniform(1, 1, 1) * (len(NEIGHBOR_KINDS) - 1)).long().clamp(max=len(NEIGHBOR_KINDS) - 2)
            other = (self.kind + 1 + step) % len(NEIGHBOR_KINDS)     # never the domain's own kind
            twice = pix.clone()
            for k in other.view(-1).unique().tolist():
                rows = (other.view(-1) == k).nonzero().view(-1)
                sub = _Draws(idx[rows.numpy()] * len(NEIGHBOR_KINDS) + k, self.seed, salt=1)
                twice[rows] = self.blend(pix[rows], NEIGHBOR_KINDS[k], sub)
            pix = torch.where(draws.uniform(1, 1, 1) < self.compose, twice, pix)
        mean, std = _mean_std(x, self.pre_mean, self.pre_std)
        return ((pix.clamp(0, 1) - mean) / std).numpy()

    def blend(self, pix: torch.Tensor, kind: str, draws: _Draws) -> torch.Tensor:
        a = self.min_strength + (1 - self.min_strength) * draws.uniform(1, 1, 1)
        return pix + a * (shift_pixels(pix, kind, draws) - pix)


def neighbor_domains(train: Rows, val: Rows, seed: int, min_strength: float, compose: float, pre_mean,
                     pre_std) -> tuple[list[Rows], list[Rows]]:
    """(train, validation) neighbor domains, one per ``NEIGHBOR_KINDS``: training domains draw afresh
    (``NEIGHBOR_VARIANTS`` per synthesized row, read a batch at a time); validation domains are one fixed
    draw over the held-out synthesized rows (another seed), kept in memory."""
    out_train, out_val = [], []
    for k in range(len(NEIGHBOR_KINDS)):
        out_train.append(NeighborRows(train, k, seed, min_strength, compose, pre_mean, pre_std))
        fixed = NeighborRows(val, k, seed + 1, min_strength, compose, pre_mean, pre_std, variants=1)
        out_val.append(ArrayRows(fixed.materialize(), val.labels))
    return out_train, out_val

"""Train a sample source model on the mnist train rows (seeded, CPU).

    python samples/train_model.py [--arch cnn|vit] [--augment colour|affine] [--epochs N] [--seed 0]

Writes, in samples/models/: STEM.pt2 (torch.export, dynamic batch), STEM.torchscript.pt
(TorchScript) and STEM.state_dict.pt (state_dict; load with
``--arch samples.models.digits_cnn:build`` or ``samples.models.digits_vit:build``), where STEM is

    --arch cnn --augment colour  (the default)  digits_cnn    ~1 minute
    --arch vit --augment colour                 digits_vit    ~6 minutes on one core
    --arch cnn --augment affine                 digits_plain  ~1 minute

Augmentation ``colour`` (default): random foreground/background colours and random
affine jitter, so the model is clearly above chance on coloured and photo-textured
digits (otherwise there would be nothing to protect). ``affine``: the same random
affine jitter only (grey digits, white on black). The model never sees the other
domains. Each architecture has its own recipe (epochs, optimiser, learning rate:
``RECIPES``); ``--epochs`` overrides the epoch count.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mapc.datasets import load_domain  # noqa: E402
from mapc.preprocess import Preprocess, apply  # noqa: E402
from samples.models import digits_cnn, digits_vit  # noqa: E402

ARCHS = {"cnn": digits_cnn.build, "vit": digits_vit.build}
# Per-architecture recipe: batch 64 and a one-cycle LR schedule for both. The cnn entry
# is the original recipe (Adam, 6 epochs); the ViT needs more epochs and AdamW.
RECIPES = {
    "cnn": dict(epochs=6, optimizer="adam", lr=2e-3, weight_decay=0.0, pct_start=0.3),
    "vit": dict(epochs=30, optimizer="adamw", lr=2e-3, weight_decay=0.05, pct_start=0.15),
}
STEMS = {("cnn", "colour"): "digits_cnn", ("vit", "colour"): "digits_vit",
         ("cnn", "affine"): "digits_plain", ("vit", "affine"): "digits_vit_plain"}

PRE = Preprocess(size=(32, 32), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)


def augment(x01: torch.Tensor, g: torch.Generator, colour: bool = True) -> torch.Tensor:
    """x01: Nx3xHxW in [0, 1] (grey replicated). Random colours (if ``colour``), then a random affine warp."""
    n = x01.shape[0]
    if colour:
        fg = torch.rand(n, 3, 1, 1, generator=g)
        bg = torch.rand(n, 3, 1, 1, generator=g)
        keep = (torch.rand(n, 1, 1, 1, generator=g) < 0.3).float()  # 30 % stay white-on-black
        fg = keep + (1 - keep) * fg
        bg = (1 - keep) * bg
        low_contrast = (fg - bg).abs().sum(1, keepdim=True) < 0.6
        fg = torch.where(low_contrast, 1 - bg, fg)
        x = bg + (fg - bg) * x01
    else:  # white on black, as loaded
        bg = torch.zeros(n, 3, 1, 1)
        x = x01
    angle = (torch.rand(n, generator=g) - 0.5) * (2 * np.pi * 12 / 360)
    scale = 0.9 + 0.2 * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.25
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    border = bg.expand_as(x)
    warped = F.grid_sample(x - border, grid, align_corners=False, padding_mode="zeros") + border
    return warped.clamp(0, 1)


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 512])).argmax(1) for i in range(0, len(x), 512)])
    return float((pred.numpy() == y).mean() * 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="cnn")
    ap.add_argument("--augment", choices=["colour", "affine"], default="colour")
    ap.add_argument("--epochs", type=int, default=None, help="default: the architecture's recipe (cnn 6, vit %d)"
                    % RECIPES["vit"]["epochs"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "models")
    args = ap.parse_args()
    recipe = RECIPES[args.arch]
    epochs = recipe["epochs"] if args.epochs is None else args.epochs
    stem = STEMS[(args.arch, args.augment)]
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    mnist = load_domain("mnist", HERE / "digits/mnist.npz")
    tr = mnist.rows("train")
    x01 = torch.from_numpy(apply(Preprocess(size=(32, 32), channels=3, mean=(0.0,), std=(1.0,)),
                                 mnist.images[tr]))
    y = torch.from_numpy(mnist.labels[tr])
    model = ARCHS[args.arch](10)
    lr = recipe["lr"]
    if recipe["optimizer"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n.endswith("weight")]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n.endswith("weight"))]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                                 {"params": rest, "weight_decay": 0.0}], lr=lr)
    steps = epochs * (len(tr) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=recipe["pct_start"])
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(tr), generator=g)
        total = 0.0
        for i in range(len(tr) // 64):
            idx = perm[i * 64:(i + 1) * 64]
            xb = (augment(x01[idx], g, colour=args.augment == "colour") - 0.5) / 0.5
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"epoch {epoch + 1}: loss {total / (len(tr) // 64):.4f}", file=sys.stderr)
    model.eval()
    print(f"{stem}: {sum(p.numel() for p in model.parameters()):,} parameters, trained in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)

    for name in ["mnist", "mnistm", "uci", "syn"]:
        d = load_domain(name, HERE / f"digits/{name}.npz")
        te = d.rows("test")
        print(f"{name:7s} test accuracy (torch): {accuracy(model, apply(PRE, d.images[te]), d.labels[te]):.1f} %")

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / f"{stem}.state_dict.pt")
    torch.jit.save(torch.jit.script(model), args.out / f"{stem}.torchscript.pt")
    example = torch.zeros(2, *PRE.input_shape)
    ep = torch.export.export(model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, args.out / f"{stem}.pt2")


if __name__ == "__main__":
    main()

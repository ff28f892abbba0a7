"""Train the sample source model on the mnist train rows (seeded, CPU, ~1 minute).

    python samples/train_model.py [--epochs 6] [--seed 0]

Writes, in samples/models/: digits_cnn.pt2 (torch.export), digits_cnn.torchscript.pt
(TorchScript) and digits_cnn.state_dict.pt (state_dict; load with
``--arch samples.models.digits_cnn:build``).

Augmentation: random foreground/background colours and random affine jitter,
so the model is clearly above chance on coloured and photo-textured digits
(otherwise there would be nothing to protect). It never sees the other
domains.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mapc.datasets import load_domain  # noqa: E402
from mapc.preprocess import Preprocess, apply  # noqa: E402
from samples.models.digits_cnn import build  # noqa: E402

PRE = Preprocess(size=(32, 32), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)


def augment(x01: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x01: Nx3xHxW in [0, 1] (grey replicated). Random colours, then a random affine warp."""
    n = x01.shape[0]
    fg = torch.rand(n, 3, 1, 1, generator=g)
    bg = torch.rand(n, 3, 1, 1, generator=g)
    keep = (torch.rand(n, 1, 1, 1, generator=g) < 0.3).float()  # 30 % stay white-on-black
    fg = keep + (1 - keep) * fg
    bg = (1 - keep) * bg
    low_contrast = (fg - bg).abs().sum(1, keepdim=True) < 0.6
    fg = torch.where(low_contrast, 1 - bg, fg)
    x = bg + (fg - bg) * x01
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
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "models")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    mnist = load_domain("mnist", HERE / "digits/mnist.npz")
    tr = mnist.rows("train")
    x01 = torch.from_numpy(apply(Preprocess(size=(32, 32), channels=3, mean=(0.0,), std=(1.0,)),
                                 mnist.images[tr]))
    y = torch.from_numpy(mnist.labels[tr])
    model = build(10)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = args.epochs * (len(tr) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(tr), generator=g)
        total = 0.0
        for i in range(len(tr) // 64):
            idx = perm[i * 64:(i + 1) * 64]
            xb = (augment(x01[idx], g) - 0.5) / 0.5
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"epoch {epoch + 1}: loss {total / (len(tr) // 64):.4f}", file=sys.stderr)
    model.eval()

    for name in ["mnist", "mnistm", "uci", "syn"]:
        d = load_domain(name, HERE / f"digits/{name}.npz")
        te = d.rows("test")
        print(f"{name:7s} test accuracy (torch): {accuracy(model, apply(PRE, d.images[te]), d.labels[te]):.1f} %")

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "digits_cnn.state_dict.pt")
    torch.jit.save(torch.jit.script(model), args.out / "digits_cnn.torchscript.pt")
    example = torch.zeros(2, *PRE.input_shape)
    ep = torch.export.export(model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(ep, args.out / "digits_cnn.pt2")


if __name__ == "__main__":
    main()

"""Scale benchmark: a real-size model on real-size images, streamed, on this machine's CPUs.

    python samples/scale_bench.py [--sizes 5000 20000] [--steps 30] [--train-steps 60] [--out build/scale]

1. Data: an ImageFolder of 224x224 JPEGs generated from the bundled digits (authorized: mnist,
   unauthorized: uci; each digit scaled into the frame with a random size and offset), with
   ``train/`` and ``test/`` folders, 250 test images per domain. The largest size is generated; each
   smaller one is a prefix of it (hard links), so the sizes hold the same data.
2. Model: the torchvision-style ResNet-18 of ``samples/models/resnet.py`` (11.2 M parameters), trained
   briefly here on the authorized train rows (no download; BatchNorm statistics recalibrated after
   training), exported as ``resnet18.pt2``.
3. For each size: ``/usr/bin/time -v mapc compile`` (ImageFolder domains stream through the DataLoader)
   and ``mapc verify`` of the artifact. Prints peak resident memory, mask-learning images/s, pass time,
   artifact latency ratio, accuracies and wall times; writes ``OUT/scale.json``.

Peak memory must not grow with the number of images (the README's bar: within 20 % between sizes).
The mask learns for only ``--steps`` steps (speed and memory are the point here, not the protection's
quality). About 15 minutes on 2 CPU cores with the defaults. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from samples.models.resnet import resnet18  # noqa: E402

SIZE = 224
TEST_PER_DOMAIN = 250
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
DOMAINS = ("mnist", "uci")      # authorized, unauthorized


def place(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 (grey or colour) digit scaled to 120-200 pixels at a random offset in a 224x224 RGB frame."""
    from PIL import Image
    rgb = np.repeat(digit[..., None], 3, -1) if digit.ndim == 2 else digit
    side = int(rng.integers(120, 201))
    big = np.asarray(Image.fromarray(rgb).resize((side, side), Image.BILINEAR))
    frame = np.zeros((SIZE, SIZE, 3), np.uint8)
    if digit.ndim == 3:   # photo-textured digits keep a textured surround
        frame[:] = np.asarray(Image.fromarray(rgb).resize((SIZE, SIZE), Image.BILINEAR)) // 2
    y, x = rng.integers(0, SIZE - side + 1, 2)
    frame[y:y + side, x:x + side] = big
    return frame


def generate(root: Path, total: int, seed: int = 0) -> None:
    """``total`` images over two domains (half each), ``TEST_PER_DOMAIN`` of each domain in test/."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for name in DOMAINS:
        with np.load(HERE / "digits" / f"{name}.npz") as f:
            images, labels, split = f["images"], f["labels"], f["split"]
        plan = {"test": np.flatnonzero(split == "test")[:TEST_PER_DOMAIN]}
        train = np.flatnonzero(split == "train")
        plan["train"] = train[np.arange(total // 2 - TEST_PER_DOMAIN) % len(train)]   # cycled, each placed anew
        for part, rows in plan.items():
            for c in range(10):
                (root / name / part / str(c)).mkdir(parents=True, exist_ok=True)
            for i, r in enumerate(rows):
                Image.fromarray(place(images[r], rng)).save(root / name / part / str(labels[r]) / f"{i:06d}.jpg",
                                                            quality=90)


def prefix(src: Path, dst: Path, total: int) -> None:
    """The first images of ``src`` (per domain: all test images, then train images in order), hard-linked."""
    for name in DOMAINS:
        files = sorted((src / name / "train").rglob("*.jpg"), key=lambda p: p.name)[:total // 2 - TEST_PER_DOMAIN]
        files += sorted((src / name / "test").rglob("*.jpg"))
        for f in files:
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            if not out.exists():
                os.link(f, out)


def train_model(data: Path, steps: int, out: Path) -> Path:
    """ResNet-18 trained for ``steps`` Adam steps (batch 32) on the authorized train images; exported .pt2."""
    from mapc.datasets import load_domain
    from mapc.rows import ImageRows
    from mapc.preprocess import Preprocess
    torch.manual_seed(0)
    d = load_domain("mnist", data / "mnist")
    rows = ImageRows(d.images, d.rows("train"), d.labels[d.rows("train")], Preprocess((SIZE, SIZE), 3, MEAN, STD))
    model = resnet18(10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = rng.integers(0, len(rows), 32)
        loss = F.cross_entropy(model(torch.from_numpy(rows.take(idx))), torch.from_numpy(rows.labels[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            print(f"train step {step}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    recalibrate_batchnorm(model, rows, rng)
    model.eval()
    print(f"ResNet-18 trained {steps} steps in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    ep = torch.export.export(model, (torch.zeros(2, 3, SIZE, SIZE),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    path = out / "resnet18.pt2"
    torch.export.save(ep, path)
    return path


@torch.no_grad()
def recalibrate_batchnorm(model, rows, rng, batches: int = 16) -> None:
    """Running statistics as the plain average over ``batches`` batches of the trained weights (after a short
    run the exponential average still remembers the first steps' weights)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for _ in range(batches):
        model(torch.from_numpy(rows.take(rng.integers(0, len(rows), 32))))


def timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run under /usr/bin/time -v: (result, wall seconds, peak RSS MiB)."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    if r.returncode not in (0, 1) or m is None:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r, wall, int(m.group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="total images per run")
    ap.add_argument("--steps", type=int, default=60, help="mask-learning steps per compile")
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "scale")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    largest = max(args.sizes)
    full = args.out / f"data_{largest}"
    if not (full / DOMAINS[1] / "test").exists():
        t0 = time.perf_counter()
        generate(full, largest)
        print(f"generated {largest} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    model = args.out / "resnet18.pt2"
    if not model.exists():
        model = train_model(full, args.train_steps, args.out)
    mapc = [sys.executable, "-m", "mapc"]
    pre = ["--input-size", str(SIZE), str(SIZE), "--channels", "3", "--mean", "0.5", "--std", "0.5"]
    config = args.out / "scale.toml"      # few steps: checkpoint often, on fewer held-out rows
    config.write_text(f"[mask]\nsteps = {args.steps}\neval_every = 5\nval_rows = 128\n")
    rows = []
    for n in sorted(args.sizes):
        data = full if n == largest else args.out / f"data_{n}"
        if n != largest:
            prefix(full, data, n)
        domains = ["--authorized", f"{DOMAINS[0]}={data / DOMAINS[0]}", "--unauthorized", f"{DOMAINS[1]}={data / DOMAINS[1]}"]
        out = args.out / f"out_{n}"
        r, wall, rss = timed([*mapc, "compile", str(model), "--config", str(config), *domains, *pre,
                              "--no-gates", "--json", "-o", str(out)])
        report = json.loads(r.stdout.splitlines()[0])
        v, vwall, vrss = timed([*mapc, "verify", str(out / "protected.onnx"), *domains, "--json"])
        d = report["domains"]
        row = {"images": n, "compile_wall_s": wall, "compile_peak_rss_mib": rss,
               "mask_images_per_s": report["mask"]["images_per_second"],
               "mask_seconds": report["timings"]["mask_seconds"], "passes_seconds": report["timings"]["passes_seconds"],
               "validate_seconds": report["timings"]["validate_seconds"],
               "latency_ratio": report["latency_ms_batch256"]["ratio"],
               "latency_ms": report["latency_ms_batch256"],
               **{n: [d[n]["original_acc"], d[n]["protected_acc"]] for n in DOMAINS},
               "verify_wall_s": vwall, "verify_peak_rss_mib": vrss, "verify_exit": v.returncode}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "scale.json").write_text(json.dumps(rows, indent=1))
    print("\n| images | compile peak RSS | mask learning | passes | latency ratio | compile wall | "
          "verify wall / peak RSS | mnist orig -> prot | uci orig -> prot |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']:,} | {r['compile_peak_rss_mib']:.0f} MiB | {r['mask_images_per_s']:.1f} img/s "
              f"({r['mask_seconds']:.0f} s) | {r['passes_seconds']:.2f} s | {r['latency_ratio']:.2f} | "
              f"{r['compile_wall_s']:.0f} s | {r['verify_wall_s']:.0f} s / {r['verify_peak_rss_mib']:.0f} MiB | "
              f"{r['mnist'][0]:.1f} -> {r['mnist'][1]:.1f} % | {r['uci'][0]:.1f} -> {r['uci'][1]:.1f} % |")
    if len(rows) > 1:
        lo, hi = rows[0]["compile_peak_rss_mib"], rows[-1]["compile_peak_rss_mib"]
        print(f"\npeak RSS {rows[-1]['images']:,} vs {rows[0]['images']:,} images: {hi / lo:.2f}x "
              f"({'within' if abs(hi / lo - 1) <= 0.2 else 'NOT within'} 20 %)")


if __name__ == "__main__":
    main()

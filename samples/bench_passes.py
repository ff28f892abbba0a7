"""Time the pass pipeline on a ResNet-18-sized model and measure latency before/after.

    python samples/bench_passes.py [--granularity weight|channel] [--density 0.7]

Builds the ResNet-18 of samples/models/resnet.py (11.7 M parameters, 1,000
classes, 3x224x224, random weights and BN statistics), draws a random mask over every Conv/Linear weight but the
classifier, exports it, runs the default pipeline and prints per-pass
seconds, node counts and initializer bytes, then the onnxruntime latency of
the optimised original and of the artifact at batch 8. Figures are printed,
never asserted.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # noqa: E402
from mapc.evaluate import latency_pair_ms, session  # noqa: E402
from mapc.export import export_onnx  # noqa: E402
from samples.models.resnet import resnet18  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--granularity", choices=["weight", "channel"], default="weight")
    ap.add_argument("--density", type=float, default=0.7, help="fraction of weights (or channels) kept")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = resnet18(1000).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    params = dict(model.named_parameters())
    masks = {}
    for n, p in params.items():
        if n.endswith("weight") and p.ndim >= 2 and n != "fc.weight":
            if args.granularity == "weight":
                masks[n] = (rng.random(p.shape) < args.density).astype(np.uint8)
            else:
                keep = (rng.random(p.shape[0]) < args.density).astype(np.uint8)
                masks[n] = np.broadcast_to(keep.reshape(-1, *([1] * (p.ndim - 1))), p.shape).copy()
    originals = {n: params[n].detach().numpy().copy() for n in masks}
    print(f"ResNet-18: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{len(masks)} masked weights, {args.granularity} masks, density {args.density}")
    onx, export_s = export_onnx(model, "export", (3, 224, 224))
    print(f"export: {export_s:.1f} s")
    t0 = time.perf_counter()
    out, records = passes.run_pipeline(onx, passes.default_pipeline(masks, originals, {"mode": "bench"}))
    total = time.perf_counter() - t0
    print(f"{'pass':22s} {'s':>6s} {'nodes':>11s} {'initializer MB':>17s}")
    for r in records:
        print(f"{r.name:22s} {r.seconds:6.2f} {r.nodes_before:5d}->{r.nodes_after:<5d} "
              f"{r.initializer_bytes_before / 1e6:8.1f}->{r.initializer_bytes_after / 1e6:<8.1f}")
    print(f"pipeline total: {total:.2f} s")
    baseline, _ = passes.run_pipeline(onx, [passes.FoldConstants(), passes.FoldBatchNorm()])
    lo, lp = latency_pair_ms(session(baseline), session(out), (8, 3, 224, 224), repeats=5)
    print(f"onnxruntime latency, batch 8: original {lo:.1f} ms, protected {lp:.1f} ms, ratio {lp / lo:.2f}")


if __name__ == "__main__":
    main()

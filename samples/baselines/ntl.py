"""NTL (non-transferable learning, Wang et al., ICLR 2022) on the bundled benchmark: the baseline mapc is
compared with.

    python samples/baselines/ntl.py [--out build/ntl] [--steps 1500] [--lr 3e-4] [--seed 0]

Starts from the sample model's weights (samples/models/digits_cnn.state_dict.pt) and fine-tunes every weight
with BatchNorm kept in inference mode (its running statistics fixed: with separate per-domain batches in
training mode they drift to a mixture of the domains and the authorized accuracy collapses at inference,
measured: 9.8 % after 3,000 steps) with the target-specified NTL objective on the train rows of the
authorized domain (mnist) and each unauthorized domain k (uci, mnistm, syn):

    L = KL(y_s || p(x_s)) - mean_k min(BETA, ALPHA * KL(y_k || p(x_k)) * MMD(f(x_s), f(x_k)))

with one-hot labels y (so KL is the cross-entropy), f the penultimate features (fc1 after ReLU) and MMD a
Gaussian-kernel maximum mean discrepancy (bandwidth the median pairwise distance); ALPHA = 0.1 and
BETA = 1.0 as in the paper. Writes OUT/ntl.onnx (exported by mapc's exporter; no mapc metadata) and
prints the training time. Measure it like any model:

    mapc verify build/ntl/ntl.onnx --baseline samples/models/digits_cnn.pt2 --input-size 32 32 --channels 3 \\
        --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 --authorized mnist=... --unauthorized uci=... ...
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
SAMPLES = HERE.parent
sys.path.insert(0, str(SAMPLES.parent))

from mapc.datasets import load_domain  # noqa: E402
from mapc.export import export_onnx  # noqa: E402
from mapc.preprocess import Preprocess, apply  # noqa: E402
from samples.models import digits_cnn  # noqa: E402

ALPHA, BETA = 0.1, 1.0
PRE = Preprocess(size=(32, 32), channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
UNAUTHORIZED = ("uci", "mnistm", "syn")


def train_rows(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = load_domain(name, SAMPLES / "digits" / f"{name}.npz")
    rows = d.rows("train")
    return torch.from_numpy(apply(PRE, d.images[rows])), torch.from_numpy(d.labels[rows]).long()


def features_and_logits(model: digits_cnn.DigitsCNN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = F.relu(model.fc1(model.features(x).flatten(1)))
    return f, model.classifier(f)


def mmd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gaussian-kernel MMD^2 between two feature batches, bandwidth the median pairwise distance."""
    z = torch.cat([a, b])
    d2 = torch.cdist(z, z).pow(2)
    bandwidth = d2.detach()[d2.detach() > 0].median().clamp_min(1e-6)
    k = torch.exp(-d2 / bandwidth)
    n = len(a)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def ntl_loss(model, xs, ys, targets) -> torch.Tensor:
    fs, zs = features_and_logits(model, xs)
    loss = F.cross_entropy(zs, ys)
    penalties = []
    for xt, yt in targets:
        ft, zt = features_and_logits(model, xt)
        penalties.append(torch.clamp(ALPHA * F.cross_entropy(zt, yt) * mmd(fs, ft), max=BETA))
    return loss - torch.stack(penalties).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/ntl"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = digits_cnn.build()
    model.load_state_dict(torch.load(SAMPLES / "models" / "digits_cnn.state_dict.pt", weights_only=True))
    t0 = time.perf_counter()
    xs, ys = train_rows("mnist")
    domains = [train_rows(n) for n in UNAUTHORIZED]
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.eval()      # BatchNorm statistics fixed; every weight (BatchNorm scale and shift included) trains
    for step in range(args.steps):
        i = torch.randint(len(xs), (args.batch,), generator=g)
        targets = []
        for xt, yt in domains:
            j = torch.randint(len(xt), (args.batch,), generator=g)
            targets.append((xt[j], yt[j]))
        loss = ntl_loss(model, xs[i], ys[i], targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    graph, _ = export_onnx(model, "state_dict", PRE.input_shape)
    onnx.save(graph, args.out / "ntl.onnx")
    print(f"NTL: {args.steps} steps in {seconds:.1f} s (2-core CPU); wrote {args.out / 'ntl.onnx'}")


if __name__ == "__main__":
    main()

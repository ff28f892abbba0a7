"""How masks learned from different seeds differ: read back from the compiled artifacts.

    python samples/mask_spread.py build/modes/data-free-0 build/modes/data-free-1 ... [--domain uci]

Each argument is a `mapc compile` output directory (protected.onnx and report.json) of the same
model. A pruned weight is an exact zero in the artifact (the mask is folded in, nothing else writes
zeros into a trained weight), so each artifact's mask reads back as ``weight != 0`` on the masked
initializers. The script prints, on the domain's test rows (onnxruntime, the report's preprocessing):

- per artifact: top-1 on the authorized domain and on ``--domain``, and how its predictions on
  ``--domain`` spread over the classes (one strong sink, or several);
- for ``--domain``, how many test rows are read correctly under k of the n masks (0..n): rows that
  every mask lets through are a floor, rows only some masks let through are the masks' own;
- majority votes: for every triple of masks, the mask that keeps what two of the three keep, and over
  all n, the mask that keeps what at least k keep, each measured like the artifacts.

It is the measurement behind samples/README.md, "Restarts, votes and proxies". It only reads.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from mapc.datasets import load_domain
from mapc.evaluate import accuracy, run_logits, session
from mapc.measure import MeasuredRows
from mapc.preprocess import preprocess_from


def test_rows(report: dict, name: str) -> MeasuredRows:
    d = report["domains"][name]
    return MeasuredRows.test_rows(load_domain(name, d["path"]), d["role"],
                                  preprocess_from(report["preprocess"])).in_memory()


def masked_weights(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    by_name = {i.name: i for i in model.graph.initializer}
    return {n: numpy_helper.to_array(by_name[n]) for n in names}


def with_mask(template: onnx.ModelProto, values: dict[str, np.ndarray], keep: dict[str, np.ndarray]) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(template)
    for init in m.graph.initializer:
        if init.name in keep:
            init.CopyFrom(numpy_helper.from_array((values[init.name] * keep[init.name]).astype(np.float32), init.name))
    return m.SerializeToString()


@dataclass
class Spread:
    """What ``spread`` measured: per artifact, top-1 per domain (authorized first), the predicted-class
    histogram on the read domain and the pruned fraction read back from its zeros (beside the report's);
    rows read correctly under k of n masks; majority votes."""
    authorized: str
    domain: str
    top1: list[dict[str, float]]
    histogram: list[list[int]]
    pruned_read_back: list[float]
    pruned_reported: list[float]
    correct_under: list[int]
    triples: dict[tuple[int, ...], dict[str, float]] = field(default_factory=dict)
    at_least: dict[int, dict[str, float]] = field(default_factory=dict)


def spread(outdirs: list[Path], domain: str) -> Spread:
    reports = [json.loads((d / "report.json").read_text()) for d in outdirs]
    models = [onnx.load(str(d / "protected.onnx")) for d in outdirs]
    auth = next(n for n, d in reports[0]["domains"].items() if d["role"] == "authorized")
    rows = {n: test_rows(reports[0], n) for n in (auth, domain)}
    names = sorted(reports[0]["mask"]["density"])
    per_model = [masked_weights(m, names) for m in models]
    weights = {n: np.stack([w[n] for w in per_model]) for n in names}
    kept = {n: w != 0 for n, w in weights.items()}             # n_models x shape
    # where any artifact keeps a weight it holds the folded original value (every artifact folds the same way)
    values = {n: np.where(kept[n].any(0), w.sum(0) / np.maximum(kept[n].sum(0), 1), 0.0) for n, w in weights.items()}

    def measure(model: bytes) -> tuple[dict[str, float], np.ndarray]:
        """Top-1 per domain, and the predicted classes on the read domain."""
        sess = session(model)
        logits = {n: run_logits(sess, r.x) for n, r in rows.items()}
        return {n: accuracy(z, rows[n].labels) for n, z in logits.items()}, logits[domain].argmax(1)

    def voted(members, k: int) -> dict[str, float]:
        keep = {n: kept[n][list(members)].sum(0) >= k for n in names}
        return measure(with_mask(models[0], values, keep))[0]

    single = [measure(m.SerializeToString()) for m in models]
    y = rows[domain].labels
    total = sum(kept[n][0].size for n in names)
    out = Spread(auth, domain, [t for t, _ in single],
                 [np.bincount(p, minlength=reports[0]["model"]["num_classes"]).tolist() for _, p in single],
                 [sum(int((~kept[n][i]).sum()) for n in names) / total for i in range(len(models))],
                 [r["mask"]["pruned_fraction"] for r in reports],
                 np.bincount(np.stack([p == y for _, p in single]).sum(0), minlength=len(models) + 1).tolist())
    if len(models) >= 3:
        out.triples = {t: voted(t, 2) for t in itertools.combinations(range(len(models)), 3)}
    out.at_least = {k: voted(range(len(models)), k) for k in range(1, len(models) + 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdirs", nargs="+", type=Path, help="mapc compile output directories of one model")
    ap.add_argument("--domain", default="uci", help="the unauthorized domain to read (default uci)")
    args = ap.parse_args()
    s = spread(args.outdirs, args.domain)
    a, u = s.authorized, s.domain
    print(f"| artifact | pruned (read back / report) | {a} | {u} | {u} predictions per class |")
    print("|---|---|---|---|---|")
    for d, t, h, pr, reported in zip(args.outdirs, s.top1, s.histogram, s.pruned_read_back, s.pruned_reported):
        print(f"| {d} | {100 * pr:.2f} / {100 * reported:.2f} % | {t[a]:.2f} % | {t[u]:.1f} % | {' '.join(map(str, h))} |")
    print(f"\n{u} test rows read correctly under k of {len(args.outdirs)} masks (k = 0..{len(args.outdirs)}): "
          f"{' '.join(map(str, s.correct_under))}")
    if s.triples:
        print(f"\n| majority of | {a} | {u} |\n|---|---|---|")
        for t, r in s.triples.items():
            print(f"| {' '.join(args.outdirs[i].name for i in t)} | {r[a]:.2f} % | {r[u]:.1f} % |")
    print(f"\n| kept by at least k of {len(args.outdirs)} | {a} | {u} |\n|---|---|---|")
    for k, r in s.at_least.items():
        print(f"| {k} | {r[a]:.2f} % | {r[u]:.1f} % |")


if __name__ == "__main__":
    main()

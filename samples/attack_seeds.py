"""Run `mapc attack` on the sample artifact for several attack seeds and print the spread.

    mapc compile --config samples/digits.toml -o build/digits
    python samples/attack_seeds.py [--artifact build/digits/protected.onnx] [--seeds 0,1,2] [--out build/attack]

Each seed draws other attacker rows and trains with another seed; the artifact
is the same. Prints, per attack, budget and unauthorized domain, the accuracy
after the attack on the artifact (min-max over seeds), the same attack on the
unprotected original, and the from-scratch reference of target fine-tuning;
then the worst case per domain over all seeds. Figures come from each run's
report.json (onnxruntime, test rows); nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "digits"


def spread(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.1f}" if abs(hi - lo) < 0.05 else f"{lo:.1f}-{hi:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", default="build/digits/protected.onnx")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="build/attack")
    args = ap.parse_args()
    reports = []
    for seed in (int(s) for s in args.seeds.split(",")):
        out = Path(args.out) / f"seed{seed}" / "report.json"
        cmd = ["mapc", "attack", args.artifact, "--baseline", str(HERE / "models" / "digits_cnn.pt2"),
               "--authorized", f"mnist={DATA / 'mnist.npz'}", *[a for d in ("uci", "mnistm", "syn") for a in
                                                               ("--unauthorized", f"{d}={DATA / (d + '.npz')}")],
               "--seed", str(seed), "--report", str(out), "-q"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode not in (0, 1):
            sys.exit(f"attack_seeds: {' '.join(cmd)} failed:\n{proc.stderr}")
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s wall", file=sys.stderr)
        reports.append(json.loads(out.read_text()))

    print("| attack | budget | domain | protected | after attack (seeds " + args.seeds + ") | original after | "
          "scratch |")
    print("|---|---|---|---|---|---|---|")
    keys = [(r["attack"], r["budget"], r["domain"]) for r in reports[0]["attacks"]]
    for key in keys:
        rows = [next(r for r in rep["attacks"] if (r["attack"], r["budget"], r["domain"]) == key) for rep in reports]
        scratch = spread([r["scratch"] for r in rows]) + " %" if "scratch" in rows[0] else "-"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {rows[0]['artifact']['before']:.1f} % | "
              f"{spread([r['artifact']['after'] for r in rows])} % | "
              f"{spread([r['original']['after'] for r in rows])} % | {scratch} |")
    print()
    print("| domain | worst attacked accuracy (not fine-tuning), over seeds | largest fine-tune gain over scratch |")
    print("|---|---|---|")
    for d in reports[0]["worst"]:
        w = [rep["worst"][d] for rep in reports]
        top = max(w, key=lambda e: e["attacked_acc"])
        ft = max(w, key=lambda e: e["finetune_gain"])
        print(f"| {d} | {top['attacked_acc']:.1f} % ({top['attack']}, {top['budget']}) | "
              f"{ft['finetune_gain']:+.1f} pts ({ft['finetune_acc']:.1f} vs {ft['scratch_acc']:.1f} %, "
              f"{ft['finetune_budget']}) |")
    t = [rep["timings"]["total_seconds"] for rep in reports]
    print(f"\nmapc attack wall time per run: {min(t):.0f}-{max(t):.0f} s (2-core CPU)")


if __name__ == "__main__":
    main()

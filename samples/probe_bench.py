"""Top-1 and linear-probe recovery per domain per seed, from compiled artifacts (onnxruntime).

    python samples/probe_bench.py [--seeds 0,1,2,3,4] [--out build/probe] [--mask KEY=VALUE ...]

For each seed: `mapc compile --config samples/digits.toml --seed N` (with the
``[mask]`` overrides given, written to a temporary config), then the artifact
is run with onnxruntime on every domain's train and test rows; printed per
unauthorized domain: top-1 on test rows and the accuracy a ridge probe
(mapc.probe) recovers from the artifact's logits with 1 % and 10 % of the
labelled train rows. Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mapc.compile import prepare_domain  # noqa: E402
from mapc.config import load_config  # noqa: E402
from mapc.datasets import load_domain  # noqa: E402
from mapc.evaluate import run_logits, session  # noqa: E402
from mapc.probe import probe_accuracy  # noqa: E402


def compile_seed(seed: int, out: Path, overrides: dict) -> dict:
    cfg_path = HERE / "digits.toml"
    if overrides:
        text = cfg_path.read_text() + "\n[mask]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in overrides.items())
        tomllib.loads(text)
        cfg_path = out.parent / f"{out.name}.toml"
        out.parent.mkdir(parents=True, exist_ok=True)
        # relative paths in the config are relative to the file: make them absolute
        for key in ("models/", "digits/"):
            text = text.replace(f'"{key}', f'"{HERE}/{key}')
        cfg_path.write_text(text)
    cmd = [sys.executable, "-m", "mapc.cli", "compile", "--config", str(cfg_path), "-o", str(out),
           "--seed", str(seed), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode not in (0, 1):
        sys.exit(f"probe_bench: {' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads((out / "report.json").read_text())


def measure(artifact: Path, splits: dict, num_classes: int) -> dict:
    s = session(str(artifact), "cpu")
    out = {}
    for n, sp in splits.items():
        lt = run_logits(s, sp.x_test)
        row = {"top1": float((lt.argmax(1) == sp.y_test).mean() * 100)}
        ltr = run_logits(s, sp.x_train)
        for frac in (0.01, 0.10):
            row[f"probe{int(frac * 100)}"] = probe_accuracy(ltr, sp.y_train, lt, sp.y_test, num_classes, frac)["acc"]
        out[n] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", type=Path, default=Path("build/probe"))
    ap.add_argument("--mask", action="append", default=[], help="[mask] override KEY=VALUE (TOML value)")
    args = ap.parse_args()
    overrides = {k: tomllib.loads(f"v = {v}")["v"] for k, v in (m.split("=", 1) for m in args.mask)}
    cfg = load_config(HERE / "digits.toml")
    domains = {**cfg.authorized, **cfg.unauthorized}
    splits = {n: prepare_domain(load_domain(n, p, 10), cfg) for n, p in domains.items()}
    names = list(cfg.unauthorized)
    print(f"[mask] overrides: {overrides or 'none (defaults)'}")
    print("| seed | mnist drop | " + " | ".join(f"{n} top-1 / probe 1 % / 10 %" for n in names) + " | mask time |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        out = args.out / f"seed{seed}"
        rep = compile_seed(seed, out, overrides)
        m = measure(out / "protected.onnx", splits, rep["model"]["num_classes"])
        cells = [f"{m[n]['top1']:.1f} / {m[n]['probe1']:.1f} / {m[n]['probe10']:.1f}" for n in names]
        print(f"| {seed} | {rep['source_drop']:+.2f} | " + " | ".join(cells) +
              f" | {rep['timings']['mask_seconds']:.0f} s |", flush=True)
        (out / "probe.json").write_text(json.dumps({"seed": seed, "source_drop": rep["source_drop"], "domains": m,
                                                    "mask_seconds": rep["timings"]["mask_seconds"]}, indent=1))


if __name__ == "__main__":
    main()

"""Top-1 and linear-probe recovery per domain per seed, from compiled artifacts (onnxruntime).

    python samples/probe_bench.py [--seeds 0,1,2,3,4] [--out build/probe] [--mask KEY=VALUE ...]

For each seed: `mapc compile --config samples/digits.toml --seed N` (with the
``[mask]`` overrides given, written to a temporary config); printed per
unauthorized domain, from the compile's report.json (measured there with
onnxruntime through mapc.measure, the path verify uses): top-1 on test rows and
the accuracy a ridge probe recovers from the artifact's logits with 1 % and 10 %
of the labelled train rows. Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", type=Path, default=Path("build/probe"))
    ap.add_argument("--mask", action="append", default=[], help="[mask] override KEY=VALUE (TOML value)")
    args = ap.parse_args()
    overrides = {k: tomllib.loads(f"v = {v}")["v"] for k, v in (m.split("=", 1) for m in args.mask)}
    names = list(tomllib.loads((HERE / "digits.toml").read_text())["unauthorized"])
    print(f"[mask] overrides: {overrides or 'none (defaults)'}")
    print("| seed | mnist drop | " + " | ".join(f"{n} top-1 / probe 1 % / 10 %" for n in names) + " | mask time |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        out = args.out / f"seed{seed}"
        rep = compile_seed(seed, out, overrides)
        d = rep["domains"]
        m = {n: {"top1": d[n]["protected_acc"], "probe1": d[n]["probe"]["protected"]["1%"],
                 "probe10": d[n]["probe"]["protected"]["10%"]} for n in names}
        cells = [f"{m[n]['top1']:.1f} / {m[n]['probe1']:.1f} / {m[n]['probe10']:.1f}" for n in names]
        print(f"| {seed} | {rep['source_drop']:+.2f} | " + " | ".join(cells) +
              f" | {rep['timings']['mask_seconds']:.0f} s |", flush=True)
        (out / "probe.json").write_text(json.dumps({"seed": seed, "source_drop": rep["source_drop"], "domains": m,
                                                    "mask_seconds": rep["timings"]["mask_seconds"]}, indent=1))


if __name__ == "__main__":
    main()

"""Ownership on the sample: the watermarked artifact, and every suspect that must not test as owned.

    mapc compile --config samples/digits.toml -o build/digits
    mapc compile --config samples/digits.toml -o build/wm --watermark build/owner.key
    for s in 1 2 3 4 5; do python samples/train_model.py --seed $s --out build/independent/seed$s; done
    python samples/ownership_check.py [--key build/owner.key] [--wrong-keys 20]

Runs `mapc verify SUSPECT --ownership KEY --authorized mnist=...` (onnxruntime, the mnist test rows) for:
the watermarked artifact with its key; the same artifact with WRONG_KEYS other keys (derived from
sha256 of a counter, so the run is repeatable); the artifact compiled without a watermark; the unprotected
original; and each independently trained model found under build/independent/. Prints one row per check
and the smallest p-value among the suspects that must not be owned. Figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MNIST = HERE / "digits" / "mnist.npz"
PRE = ["--input-size", "32", "32", "--channels", "3", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]


def check(suspect: Path, key: Path, extra: list[str]) -> dict:
    cmd = ["mapc", "verify", str(suspect), "--ownership", str(key), "--authorized", f"mnist={MNIST}", "--json",
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        sys.exit(f"ownership_check: {' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[0])["ownership"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--key", default="build/owner.key")
    ap.add_argument("--watermarked", default="build/wm/protected.onnx")
    ap.add_argument("--plain", default="build/digits/protected.onnx", help="the artifact without a watermark")
    ap.add_argument("--original", default=str(HERE / "models" / "digits_cnn.pt2"))
    ap.add_argument("--independent", default="build/independent")
    ap.add_argument("--wrong-keys", type=int, default=20)
    args = ap.parse_args()
    key = Path(args.key)
    rows = [("watermarked artifact", "owner's key", True, check(Path(args.watermarked), key, []))]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.wrong_keys):
            wrong = Path(tmp) / f"wrong{i}.key"
            wrong.write_bytes(hashlib.sha256(b"wrong key %d" % i).digest())
            rows.append(("watermarked artifact", f"wrong key {i + 1}", False, check(Path(args.watermarked), wrong, [])))
    rows.append(("artifact without watermark", "owner's key", False, check(Path(args.plain), key, [])))
    rows.append(("unprotected original", "owner's key", False, check(Path(args.original), key, PRE)))
    for model in sorted(Path(args.independent).glob("*/digits_cnn.pt2")):
        rows.append((f"independent model ({model.parent.name})", "owner's key", False, check(model, key, PRE)))

    print("| suspect | key | clean | key trigger | control | b / c | p | effect | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    for suspect, which, _, o in rows:
        print(f"| {suspect} | {which} | {o['clean_acc']:.1f} % | {o['key_acc']:.1f} % | {o['control_acc']:.1f} % | "
              f"{o['b']} / {o['c']} | {o['p_value']} | {o['effect'] * 100:.0f} % | "
              f"{'OWNED' if o['owned'] else 'NOT OWNED'} |")
    negatives = [o for _, _, should, o in rows if not should]
    smallest = min(negatives, key=lambda o: o["log10_p"])
    print(f"\nmust not be owned: {len(negatives)} checks, {sum(o['owned'] for o in negatives)} OWNED, "
          f"{sum(o['log10_p'] < -3 for o in negatives)} with p < 1e-3; smallest p {smallest['p_value']}; largest "
          f"effect {max(o['effect'] for o in negatives) * 100:.0f} % (the owner's key: {rows[0][3]['effect'] * 100:.0f} %)")


if __name__ == "__main__":
    main()

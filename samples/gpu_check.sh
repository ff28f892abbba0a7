#!/usr/bin/env bash
# GPU check: the sample compile with mask learning on CUDA, verified with onnxruntime's CUDA provider.
#
#   bash samples/gpu_check.sh [OUT]        (default OUT: build/gpu_check; run from the repository root)
#
# On a machine with an NVIDIA GPU it
#   1. makes sure torch is a CUDA build (installs torch==2.13.0 from PyPI, whose Linux wheel is CUDA's,
#      into ./.venv-gpu when the current torch is CPU-only) and that onnxruntime-gpu sees CUDA;
#   2. compiles the sample with --device cuda (mask learning on the GPU) and prints mask images/s;
#   3. compiles the same sample on the CPU (the reference artifact);
#   4. verifies the GPU artifact with --provider cuda and prints its figures;
#   5. prints parity: the GPU artifact against the CPU artifact (top-1 agreement, accuracies) and the
#      CPU artifact run by the CUDA provider against the CPU provider (max |logit difference|).
# On a machine without one it runs the CPU compile and says which GPU parts it skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  has_gpu=1
  nvidia-smi -L
fi

if [ "$has_gpu" = 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[gpu_check] torch here is CPU-only: installing the CUDA build into .venv-gpu" >&2
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install --quiet torch==2.13.0 && .venv-gpu/bin/pip install --quiet -e .
  PY=.venv-gpu/bin/python
fi
MAPC=("$PY" -m mapc)
"$PY" - <<'EOF'
import onnxruntime as ort, torch
print(f"[gpu_check] torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}; "
      f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
EOF

echo "[gpu_check] CPU reference compile" >&2
"${MAPC[@]}" compile --config samples/digits.toml --device cpu -o "$OUT/cpu" --no-gates -q --json > "$OUT/cpu.json"

if [ "$has_gpu" = 0 ]; then
  "$PY" - "$OUT" <<'EOF'
import json, sys
r = json.loads(open(f"{sys.argv[1]}/cpu.json").readline())
print(f"CPU: mask learning {r['mask']['images_per_second']:.0f} images/s ({r['timings']['mask_seconds']:.1f} s)")
EOF
  echo "SKIPPED the GPU parts: no NVIDIA GPU here (nvidia-smi finds none); ran the CPU compile only"
  exit 0
fi

echo "[gpu_check] GPU compile (--device cuda)" >&2
"${MAPC[@]}" compile --config samples/digits.toml --device cuda -o "$OUT/cuda" --no-gates -q --json > "$OUT/cuda.json"
echo "[gpu_check] verify the GPU artifact with the CUDA provider" >&2
"${MAPC[@]}" verify "$OUT/cuda/protected.onnx" --authorized mnist=samples/digits/mnist.npz \
  --unauthorized uci=samples/digits/uci.npz --unauthorized mnistm=samples/digits/mnistm.npz \
  --unauthorized syn=samples/digits/syn.npz --provider cuda --json > "$OUT/verify_cuda.json" || true

"$PY" - "$OUT" <<'EOF'
import json, sys
import numpy as np
from mapc.datasets import load_domain
from mapc.evaluate import run_logits, session
from mapc.preprocess import apply, preprocess_from
from passes import read_metadata
import onnx

out = sys.argv[1]
cpu, gpu = (json.loads(open(f"{out}/{k}.json").readline()) for k in ("cpu", "cuda"))
lines = open(f"{out}/verify_cuda.json").read().splitlines()
ver, verdict = json.loads(lines[0]), lines[-1]
for name, r in (("CPU", cpu), ("GPU", gpu)):
    print(f"{name}: mask learning {r['mask']['images_per_second']:.0f} images/s ({r['timings']['mask_seconds']:.1f} s, "
          f"device {r['learning_device']}); " + ", ".join(f"{d} {e['protected_acc']:.1f} %" for d, e in r["domains"].items()))
print(f"verify --provider cuda: providers {ver['providers']}; " +
      ", ".join(f"{d} {e['protected_acc']:.1f} %" for d, e in ver["domains"].items()) + f"; {verdict}")
art = {k: onnx.load(f"{out}/{k}/protected.onnx") for k in ("cpu", "cuda")}
pre = preprocess_from(read_metadata(art["cpu"])["mapc.preprocess"])
agree, rows, diff = 0, 0, 0.0
s_cpu, s_gpu = session(art["cpu"], "cpu"), session(art["cuda"], "cpu")
s_cpu_on_cuda = session(art["cpu"], "cuda")
for name in ("mnist", "uci", "mnistm", "syn"):
    d = load_domain(name, f"samples/digits/{name}.npz")
    x = apply(pre, np.asarray(d.images[d.rows("test")]))
    a, b = run_logits(s_cpu, x), run_logits(s_gpu, x)
    agree += int((a.argmax(1) == b.argmax(1)).sum()); rows += len(x)
    diff = max(diff, float(np.abs(run_logits(s_cpu_on_cuda, x) - a).max()))
print(f"parity: GPU-learned vs CPU-learned artifact top-1 agreement {agree / rows * 100:.2f} % over {rows} test rows "
      f"(different masks: float order differs); CPU artifact on CUDA vs CPU provider max |logit diff| {diff:.2e}")
EOF

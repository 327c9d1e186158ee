#!/usr/bin/env bash
# One prepared run on a lent accelerator (see docs/benchmarks.md): the step-overhead benchmark on CUDA.
# Usage there: bash benchmarks/device_run.sh OUTDIR   (expects opacus wheels in .whl/ if opacus is missing)
set -uo pipefail
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
if ! python3 -c "import opacus" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/opacus-*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, transformers, peft, opacus; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'opacus', opacus.__version__)" | tee -a "$OUT/device.txt"
python3 benchmarks/step_overhead.py --device cuda --preset small medium --rounds 2 --steps 40 --warmup 10 \
  --out "$OUT/step_overhead_cuda.json" 2>&1 | tee "$OUT/step_overhead_cuda.log"

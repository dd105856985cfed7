#!/usr/bin/env bash
# One scripted session on a GPU machine: build the extensions for the visible GPU, run the whole
# test suite there, then benchmark. Results go to $OUT (default bench/results/latest/).
#   bash bench/gpu_session.sh [test|bench|train|all] [extra bench/attn.py arguments...]
set -uo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"; shift || true
out="${OUT:-bench/results/latest}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
start=$(date +%s)
$py -m pip install -e . --no-build-isolation --no-deps -q >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; }
echo "build: $(( $(date +%s) - start )) s"
$py -m ultimus_kernels | tee -a "$out/device.txt"
if [[ "$what" == test || "$what" == all ]]; then
  timeout 420 $py -m pytest -q -rfEs -p no:cacheprovider 2>&1 | tee "$out/pytest.txt" | tail -40
fi
if [[ "$what" == bench || "$what" == all ]]; then
  $py bench/attn.py --no-progress --json "$out/attn.json" --plot "$out/attn.png" "$@" 2>&1 | tee "$out/attn.txt"
fi
if [[ "$what" == model ]]; then
  $py bench/attn.py --model --no-progress --json "$out/model.json" "$@" 2>&1 | tee "$out/model.txt"
fi

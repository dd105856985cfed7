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
if $py -c "import ultimus_kernels._C, ultimus_kernels._C_cuda" 2>/dev/null; then
  echo "build: reusing the compiled extensions found in ultimus_kernels/"
else
  $py -m pip install -e . --no-build-isolation --no-deps -q >"$out/build.log" 2>&1 || tail -30 "$out/build.log"
  echo "build: $(( $(date +%s) - start )) s"
  cp ultimus_kernels/_C*.so ultimus_kernels/_build_info.json "$out/" 2>/dev/null || true
fi
$py -m ultimus_kernels | tee -a "$out/device.txt"
if [[ "$what" == test || "$what" == all ]]; then
  # PYTEST_ARGS narrows the run, e.g. PYTEST_ARGS='-k "triton or gpu"'
  eval timeout "${PYTEST_TIMEOUT:-420}" $py -m pytest -q -rfE -p no:cacheprovider --durations=8 "${PYTEST_ARGS:-}" 2>&1 \
    | grep -v DEBUG | tee "$out/pytest.txt" | tail -40
fi
if [[ "$what" == bench || "$what" == all ]]; then
  $py bench/attn.py --no-progress --json "$out/attn.json" --plot "$out/attn.png" "$@" 2>&1 | tee "$out/attn.txt"
fi
if [[ "$what" == model ]]; then
  $py bench/attn.py --model --no-progress --json "$out/model.json" "$@" 2>&1 | tee "$out/model.txt"
fi

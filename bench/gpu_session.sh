#!/usr/bin/env bash
# One scripted session on a GPU machine: build (or reuse) the extensions, then any of
#   test   the test suite on the GPU (PYTEST_ARGS narrows it, e.g. PYTEST_ARGS='-k triton')
#   bench  bench/attn.py (extra arguments in BENCH_ARGS)
#   stack  bench/attn.py --stack 4: the fused stack of 4 blocks against 4 single fused calls
#   model  bench/attn.py --model: one UltimusNet training step per backend
#   overhead  bench/attn.py --overhead: us per call of each autograd boundary at B = 1 and 128
#   train  train.py epochs on --dataset synthetic at CIFAR-10's sizes, per backend (and --cuda-graph)
#   graph  train.py --cuda-graph against eager: 24 epochs each, the issue-13 run (history.json kept)
# Results go to $OUT (default bench/results/latest/).   Example:
#   BENCH_ARGS="--batch-sizes 128,4096,1048576" bash bench/gpu_session.sh test bench model train
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/latest}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
py="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
# Extensions built on an earlier machine of the same kind may be carried in .device_build/.
[[ -d .device_build ]] && cp .device_build/_C*.so .device_build/_build_info.json ultimus_kernels/ 2>/dev/null
if $py -c "import ultimus_kernels._C, ultimus_kernels._C_cuda" 2>/dev/null; then
  echo "build: reusing the compiled extensions found in ultimus_kernels/"
else
  start=$(date +%s)
  $py -m pip install -e . --no-build-isolation --no-deps -q >"$out/build.log" 2>&1 || tail -30 "$out/build.log"
  echo "build: $(( $(date +%s) - start )) s"
  cp ultimus_kernels/_C*.so ultimus_kernels/_build_info.json "$out/" 2>/dev/null || true
fi
$py -m ultimus_kernels | tail -6 | tee -a "$out/device.txt"
for what in "$@"; do
  case "$what" in
    test)
      eval timeout "${PYTEST_TIMEOUT:-420}" $py -m pytest -q -rfE --tb=line -p no:cacheprovider --durations=5 \
        "${PYTEST_ARGS:-}" 2>&1 | grep -v DEBUG | tee "$out/pytest.txt" | tail -25 ;;
    bench)
      eval timeout "${BENCH_TIMEOUT:-300}" $py bench/attn.py --no-progress --json "$out/attn.json" \
        --plot "$out/attn.png" "${BENCH_ARGS:-}" 2>&1 | tee "$out/attn.txt" ;;
    stack)
      timeout "${BENCH_TIMEOUT:-300}" $py bench/attn.py --stack 4 --dtype float32 --no-progress \
        --batch-sizes 128,16384,1048576 --json "$out/stack.json" 2>&1 | tee "$out/stack.txt" ;;
    model)
      timeout 120 $py bench/attn.py --model --no-progress --json "$out/model.json" 2>&1 | tee "$out/model.txt" ;;
    overhead)
      timeout 300 $py bench/attn.py --overhead --no-progress --json "$out/overhead.json" 2>&1 | tee "$out/overhead.txt" ;;
    train)
      for cfg in "reference" "triton" "cuda" "cuda --amp bf16" "cuda --cuda-graph"; do
        echo "== train.py --backend $cfg"
        run_dir="$(mktemp -d)/run"  # a fresh folder per run: train.py refuses one that holds a run
        timeout 100 $py train.py --dataset synthetic --epochs 2 --no-progress --backend $cfg --out "$run_dir" \
          2>&1 | grep -E "epoch|UltimusNet|error" ;
      done 2>&1 | tee "$out/train.txt" ;;
    graph)
      for cfg in "--cuda-graph" ""; do
        run_dir="$out/train24${cfg:+-graph}"
        rm -rf "$run_dir"
        start=$(date +%s)
        timeout 280 $py train.py --dataset synthetic --backend cuda $cfg --no-progress --out "$run_dir" \
          2>&1 | grep -E "epoch|UltimusNet|error|done|warn" ;
        echo "== train.py --backend cuda $cfg: $(( $(date +%s) - start )) s wall, 24 epochs"
      done 2>&1 | tee "$out/graph.txt" ;;
  esac
done

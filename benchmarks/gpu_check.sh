#!/usr/bin/env bash
# One-shot GPU verification (H200 image: Python 3.12, torch 2.11 + CUDA, triton 3.6, nvcc; no network).
#   bash benchmarks/gpu_check.sh OUT_DIR
# Builds the CUDA extension, runs the GPU tests and the GPU benchmark, and leaves logs + CSV in
# OUT_DIR. Every step has its own time limit so the whole script stays bounded and
# always writes its summary (under 9 minutes: the device allows 10 per call).
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FASTDISTILL_CUDA=1
PY=${PYTHON:-python3}
summary="$OUT/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - t0)) s) $(tail -n 1 "$OUT/$name.log")" | tee -a "$summary"
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >> "$summary" 2>&1

step build 150 $PY setup.py build_ext --inplace || { cat "$summary"; exit 1; }
step info 30 $PY -m fastdistill info
step test_gpu 90 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
step test_parity 90 $PY -m pytest -q -x tests/test_distill_loss.py tests/test_distill_loss_api.py \
  tests/test_distill_loss_compile.py tests/test_fused_linear_distill_loss.py \
  tests/test_fused_linear_distill_loss_api.py tests/test_topk_distill_loss.py tests/test_topk_distill_loss_api.py \
  -k "cuda or triton" -p no:cacheprovider
step bench 90 $PY benchmarks/bench_distill_loss.py --device cuda --modes full fwd --divergence kl jsd \
  --reps 10 --out distill_loss_h200 --csv-dir "$OUT"
step bench_fused_linear 90 $PY benchmarks/bench_fused_linear.py --device cuda --tokens 8192 1024 --modes full \
  --reps 5 --out fused_linear_h200 --csv-dir "$OUT"
step ceilings 60 $PY benchmarks/gpu_ceilings.py --csv-dir "$OUT"
cat "$summary"

#!/usr/bin/env bash
# Every GPU check in one run of under 10 minutes, on a GPU machine (without network access: bring .whl/ from bench/wheels.sh):
#   1. bench/gpu_check.sh: the benchmark table, the targets' PASS/FAIL lines, levers while time is left;
#   2. tests/test_gpu.py: bf16 + per-block compile training through the CLI (NCCL group, SDPA kernels, fused loss on CUDA,
#      checkpoint at step 6 and a resume to step 8).
# Each part has its own time box, so one part hanging still leaves the other's output. Logs go to $OUT (or bench/results).
#   bash bench/gpu_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
start=$SECONDS
BENCH_TIMEOUT=${BENCH_TIMEOUT:-290} BENCH_BUDGET=${BENCH_BUDGET:-190} bash bench/gpu_check.sh
bench_status=$?
echo "=== bench: exit $bench_status after $((SECONDS - start)) s ==="
# /tmp/site: the wheels gpu_check.sh installed from .whl/ (absent otherwise, harmless on the path)
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
timeout "${TEST_TIMEOUT:-230}" python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT_DIR/test_gpu.log"
test_status=${PIPESTATUS[0]}
echo "=== tests/test_gpu.py: exit $test_status after $((SECONDS - start)) s ==="
[ "$bench_status" -eq 0 ] && [ "$test_status" -eq 0 ]

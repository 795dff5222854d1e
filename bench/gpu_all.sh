#!/usr/bin/env bash
# Every GPU target (bench/cases.py) in one run of under 8 minutes, on a GPU machine (without network access: bring .whl/ from
# bench/wheels.sh, and data/shakespeare, which git ignores, for the real loop):
#   1. the benchmark (bench/gpu_check.sh): B=8 T=2048 no AC + the reference, full AC, selective AC, median of 3
#      interleaved rounds, op counts (--count-ops), then levers while its budget lasts; the targets' PASS/FAIL lines;
#   2. the real loop: `smollm2.train` at the same shape (B=8 T=2048, no AC, accum 1) on a real shard (data/shakespeare,
#      GPT-2 tokens; a random-token shard if it is missing), compared with the benchmark's no-AC row (bench/real_loop.py,
#      target >= 0.95x);
#   3. tests/test_gpu.py: bf16 + per-block compile training through the CLI (NCCL group, SDPA kernels, fused loss on CUDA,
#      checkpoint at step 6 and a resume to step 8).
# Each part has its own time box (defaults: 225 + 115 + 125 s = 465 s, plus startup), so one part hanging still leaves the
# others' output. Logs and JSON go to $OUT (or bench/results).
#   bash bench/gpu_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
start=$SECONDS
BENCH_TIMEOUT=${BENCH_TIMEOUT:-225} BENCH_BUDGET=${BENCH_BUDGET:-150} bash bench/gpu_check.sh --rounds 3 --count-ops \
  --cases B=8,T=2048,ac=none,ref=1 B=8,T=2048,ac=full B=8,T=2048,ac=selective B=8,T=2048,ac=none,cpp=true \
  B=8,T=2048,ac=none,wrap=block
bench_status=$?
echo "=== bench: exit $bench_status after $((SECONDS - start)) s ==="
# /tmp/site: the wheels gpu_check.sh installed from .whl/ (absent otherwise, harmless on the path)
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache

DATA=${REAL_DATA:-data/shakespeare}
if ! compgen -G "$DATA/*train*.bin" >/dev/null; then
  DATA=/tmp/real_loop_data
  echo "=== real loop: no shard in ${REAL_DATA:-data/shakespeare}; writing random GPT-2 tokens to $DATA (not a real shard) ==="
  python3 -c "
import numpy as np; from pathlib import Path; from smollm2.data.shards import write_shard
out = Path('$DATA'); out.mkdir(parents=True, exist_ok=True); rng = np.random.default_rng(0)
write_shard(out / 'fineweb_train_000001.bin', rng.integers(0, 50257, 2_000_000).astype(np.uint16))
write_shard(out / 'fineweb_val_000000.bin', rng.integers(0, 50257, 100_000).astype(np.uint16))"
fi
rm -rf "$OUT_DIR/real_run"
timeout "${REAL_TIMEOUT:-115}" python3 -m smollm2.train --config configs/smollm2_135.yaml "data.path=$DATA" \
  "train.run_dir=$OUT_DIR/real_run" train.max_steps=${REAL_STEPS:-60} train.grad_accum=1 data.micro_batch=8 \
  data.seq_len=2048 train.activation_checkpointing=none logging.interval=10 eval.interval=0 sample.interval=0 \
  checkpoint.interval=0 logging.wandb.mode=disabled 2>&1 | tail -n 25 | tee "$OUT_DIR/real_loop.log"
real_status=${PIPESTATUS[0]}
if [ -f "$OUT_DIR/real_run/metrics.jsonl" ] && [ -f "$OUT_DIR/bench.json" ]; then
  python3 -m bench.real_loop --metrics "$OUT_DIR/real_run/metrics.jsonl" --bench "$OUT_DIR/bench.json" \
    --case "B=8 T=2048 accum=1 ac=none compile=auto" --skip 1 | tee -a "$OUT_DIR/real_loop.log"
fi
rm -rf "$OUT_DIR/real_run/checkpoints"  # the final checkpoint (1.5 GB) need not come back
echo "=== real loop: exit $real_status after $((SECONDS - start)) s ==="

timeout "${TEST_TIMEOUT:-125}" python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT_DIR/test_gpu.log"
test_status=${PIPESTATUS[0]}
echo "=== tests/test_gpu.py: exit $test_status after $((SECONDS - start)) s ==="
[ "$bench_status" -eq 0 ] && [ "$real_status" -eq 0 ] && [ "$test_status" -eq 0 ]

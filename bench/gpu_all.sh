#!/usr/bin/env bash
# Every GPU target (bench/cases.py) in one run of under 10 minutes (one device call),
# on a GPU machine (without network access: bring .whl/ from bench/wheels.sh, and data/shakespeare, which git ignores,
# for the real loop):
#   1. the benchmark (bench/gpu_check.sh): B=8 T=2048 no AC + the reference, full AC, selective AC, median of 3
#      interleaved rounds, op counts (--count-ops), then levers while its budget lasts; the targets' PASS/FAIL lines;
#   2. the real loop: `smollm2.train` at the same shape (B=8 T=2048, no AC, accum 1) on a real shard (data/shakespeare,
#      GPT-2 tokens; a random-token shard if it is missing), compared with the benchmark's no-AC row (bench/real_loop.py,
#      target >= 0.95x);
#   3. tests/test_gpu.py: bf16 + per-block compile training through the CLI (NCCL group, SDPA kernels, fused loss on CUDA,
#      checkpoint at step 6 and a resume to step 8);
#   4. document masking: the seed model's step at B=8 T=2048 (the preset's full AC: the recompute carries the plan) plain
#      vs masked by sdpa + mask and by auto (flash-attn varlen where installed, else flex), on windows of log-normal
#      documents of mean 600 tokens (bench/doc_masking.py); then the GPU cases of tests/test_document_masking.py (each
#      kernel against SDPA with the mask). DOC_MASKING_TIMEOUT=0 skips this part.
# Each part has its own time box (defaults: 190 + 115 + 110 + 150 s = 565 s, plus startup), so one
# part hanging still leaves the others' output. Logs and JSON go to $OUT (or bench/results).
#   bash bench/gpu_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
start=$SECONDS
BENCH_TIMEOUT=${BENCH_TIMEOUT:-190} BENCH_BUDGET=${BENCH_BUDGET:-120} bash bench/gpu_check.sh --rounds 3 --count-ops \
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

timeout "${TEST_TIMEOUT:-110}" python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT_DIR/test_gpu.log"
test_status=${PIPESTATUS[0]}
echo "=== tests/test_gpu.py: exit $test_status after $((SECONDS - start)) s ==="

mask_status=0
if [ "${DOC_MASKING_TIMEOUT:-150}" -gt 0 ]; then
  # 5/8 of the box to the bench (3 models, each compiled), the rest to the GPU tests (flex compiles included)
  timeout "$(( ${DOC_MASKING_TIMEOUT:-150} * 5 / 8 ))" python3 -m bench.doc_masking --config configs/smollm2_135.yaml \
    --no-proxy --batch 8 --seq-len 2048 --kernels sdpa auto --warmup 2 --steps 6 --rounds 1 \
    --json "$OUT_DIR/doc_masking.json" 2>&1 | tail -n 20 | tee "$OUT_DIR/doc_masking.log"
  mask_status=${PIPESTATUS[0]}
  timeout "$(( ${DOC_MASKING_TIMEOUT:-150} * 3 / 8 ))" python3 -m pytest -q -rs -p no:cacheprovider -m gpu \
    tests/test_document_masking.py 2>&1 | tail -n 15 | tee -a "$OUT_DIR/doc_masking.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || mask_status=1
  echo "=== document masking: exit $mask_status after $((SECONDS - start)) s ==="
fi
[ "$bench_status" -eq 0 ] && [ "$real_status" -eq 0 ] && [ "$test_status" -eq 0 ] && [ "$mask_status" -eq 0 ]

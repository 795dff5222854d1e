#!/usr/bin/env bash
# The GPU benchmark in one time-boxed run: environment, then the whole benchmark table and the targets' PASS/FAIL lines.
#   bash bench/gpu_check.sh [extra bench.step args]        JSON + log go to $OUT when set, else bench/results
# The sweep starts with the targets' rows (B=8 T=2048: no AC + reference, full, selective); levers follow and are skipped
# once BENCH_BUDGET seconds have passed, so the table always prints inside BENCH_TIMEOUT.
# On a GPU machine without network access, first run bench/wheels.sh where pip works and bring .whl/ along.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then  # omegaconf may be missing from a GPU image: wheels built by bench/wheels.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export WANDB_MODE=disabled TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cache
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
nvidia-smi || true
python3 -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
'| cudnn', torch.backends.cudnn.version(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
timeout "${BENCH_TIMEOUT:-430}" python3 -m bench.step --budget-s "${BENCH_BUDGET:-240}" --json "$OUT_DIR/bench.json" "$@" \
  2>&1 | tee "$OUT_DIR/bench.log"
status=${PIPESTATUS[0]}
echo "bench exit status $status"
exit "$status"

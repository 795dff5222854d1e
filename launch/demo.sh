#!/usr/bin/env bash
# The CPU demo (`make demo`): phase 1 + phase 2 of configs/tiny.yaml on 2 gloo ranks through launch/train.sh, then the
# loss at start and end and a few samples from the final checkpoint. Expects data/shakespeare (make prep).
#   DEMO_STEPS=150 (phase 1; phase 2 adds 10)  RUN_DIR=runs/demo  NPROC=2
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RUN_DIR=${RUN_DIR:-runs/demo}
P1=${DEMO_STEPS:-150}
P2=$((P1 + 10))
start=$(date +%s)
rm -rf "$RUN_DIR"  # the demo always starts fresh
NPROC=${NPROC:-2} PHASE1_STEPS=$P1 PHASE2_STEPS=$P2 PYTHON=$PYTHON \
  launch/train.sh configs/tiny.yaml "train.run_dir=$RUN_DIR" "optim.decay_steps=$P2" "$@"
echo
echo "=== loss ==="
$PYTHON - "$RUN_DIR" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
evals = [json.loads(line) for line in open(f"{sys.argv[1]}/eval.jsonl")]
print(f"train loss: step {rows[0]['step']} {rows[0]['loss']:.3f} -> step {rows[-1]['step']} {rows[-1]['loss']:.3f}")
print(f"val loss:   step {evals[0]['step']} {evals[0]['val_loss']:.3f} -> step {evals[-1]['step']} {evals[-1]['val_loss']:.3f}")
if not rows[-1]["loss"] < rows[0]["loss"]:
    sys.exit("the demo's loss did not go down")
PY
echo
echo "=== samples from $RUN_DIR/checkpoints/latest (T=1.0, top-k 50, top-p 0.95) ==="
$PYTHON -m smollm2.generate --checkpoint "$RUN_DIR/checkpoints/latest" --max-new-tokens 40 \
  --prompt "ROMEO:" --prompt "To be, or not to be" --prompt "KING HENRY:"
echo
if [ -f "$RUN_DIR/plots/training.png" ]; then  # drawn by launch/train.sh
  echo "=== training plot: $RUN_DIR/plots/training.png (redraw: python -m smollm2.plot $RUN_DIR) ==="
else
  echo "warning: no training plot in $RUN_DIR/plots (python -m smollm2.plot $RUN_DIR says why)" >&2
fi
echo
echo "=== demo done in $(( $(date +%s) - start ))s: $RUN_DIR ==="

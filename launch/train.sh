#!/usr/bin/env bash
# Phase 1 (train to PHASE1_STEPS) then phase 2 (resume from the latest checkpoint, train to PHASE2_STEPS), each verified:
# the exit code, a complete checkpoint at the expected step, and that step recorded in its meta.json.
#
#   launch/train.sh configs/smollm2_135.yaml [key=value ...]
#   NPROC=8 PHASE1_STEPS=5000 PHASE2_STEPS=5050 launch/train.sh configs/smollm2_135.yaml
#
# NPROC: ranks on this node (default: the number of GPUs, or 1 without CUDA). Multi-node: use launch/slurm.sbatch.
# Extra key=value arguments go to both phases. Exits non-zero, naming the phase, if either phase does not complete.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
config=${1:?usage: launch/train.sh CONFIG [key=value ...]}
shift
PYTHON=${PYTHON:-python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$($PYTHON -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
P1=${PHASE1_STEPS:-5000}
P2=${PHASE2_STEPS:-5050}
# The run dir the trainer will use (config + overrides); a bad config stops here with its one-line error (exit 2).
run_dir=$($PYTHON -m smollm2.checkpoint run-dir "$config" "$@")
launcher=(torchrun --standalone --nproc_per_node="$NPROC")
# shellcheck disable=SC2206  # unquoted on purpose, as everywhere here: PYTHON may carry flags ("python -X dev")
[ "$NPROC" = "1" ] && launcher=($PYTHON)

phase() {  # phase NAME STEPS [extra args...]
  local name=$1 steps=$2
  shift 2
  echo "=== $name: train to step $steps on $NPROC rank(s), run dir $run_dir ==="
  if ! "${launcher[@]}" -m smollm2.train --config "$config" "$@" "train.max_steps=$steps"; then
    echo "FAILED: $name did not complete (the trainer exited non-zero); see the log above" >&2
    exit 1
  fi
  if ! $PYTHON -m smollm2.checkpoint verify "$run_dir" "$steps"; then
    echo "FAILED: $name exited 0 but left no verified checkpoint at step $steps" >&2
    exit 1
  fi
}

# Both phases pass --resume latest: phase 1 then also continues after a crash or preemption when the script is rerun.
phase "phase 1" "$P1" "$@" --resume latest
phase "phase 2" "$P2" "$@" --resume latest
echo "=== both phases verified: $run_dir/checkpoints/latest is step $P2 ==="

#!/usr/bin/env bash
# Phase 1 (train to PHASE1_STEPS) then phase 2 (resume from the latest checkpoint, train to PHASE2_STEPS), each verified:
# the exit code, a complete checkpoint at the expected step, and that step recorded in its meta.json.
#
#   launch/train.sh configs/smollm2_135.yaml [key=value ...]
#   NPROC=8 PHASE1_STEPS=5000 PHASE2_STEPS=5050 launch/train.sh configs/smollm2_135.yaml
#
# NPROC: ranks on this node (default: the number of GPUs, or 1 without CUDA). Multi-node: use launch/slurm.sbatch.
# Extra key=value arguments go to both phases. Exits non-zero, naming the phase, if either phase does not complete.
#
# Stopping: SIGTERM or SIGUSR1, sent to this script or to torchrun, or Ctrl-C in its terminal, reaches every rank; they
# checkpoint at their next log step and the script exits 75 (the stop code, not a failure) saying "stopped at step N by a
# signal; rerun to continue". A second Ctrl-C ends the run at once, without a checkpoint (exit 130).
# Rerunning it continues. After forwarding a signal torchrun waits SMOLLM2_STOP_GRACE_S seconds (default 300) for the
# ranks to exit, then SIGKILLs them: keep it above a log interval plus a checkpoint (a seed-model save: ~5 s).
#
# What torchrun can do depends on the torch version: see torchrun_flags in launch/env.sh.
#
# Crashes: MAX_RESTARTS=N (NPROC > 1) makes torchrun restart every rank up to N times when one dies; they continue from
# the newest complete checkpoint by themselves (the launch line passes --resume latest).
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
STOP_CODE=75  # smollm2.errors.STOP_EXIT_CODE
usr1_as=USR1  # the signal this script passes on when it receives SIGUSR1 (see torchrun_flags in launch/env.sh)
if [ "$NPROC" = "1" ]; then
  # shellcheck disable=SC2206  # unquoted on purpose, as everywhere here: PYTHON may carry flags ("python -X dev")
  launcher=($PYTHON)  # one process, no torchrun: the trainer gets the signals itself
else
  torchrun_flags torchrun
  launcher=(torchrun --standalone --nproc_per_node="$NPROC" "${TORCHRUN_FLAGS[@]}")
  usr1_as=$USR1_AS
fi

phase() {  # phase NAME STEPS [extra args...]
  local name=$1 steps=$2
  shift 2
  echo "=== $name: train to step $steps on $NPROC rank(s), run dir $run_dir ==="
  rm -f "$run_dir/STOPPED"  # left by an earlier stop; the trainer writes it anew if this run is stopped
  # In the background, so that a signal to this script is passed on (bash would die of SIGUSR1 and orphan the job).
  "${launcher[@]}" -m smollm2.train --config "$config" "$@" "train.max_steps=$steps" &
  local child=$! rc=0
  trap 'kill -s "$usr1_as" "$child" 2>/dev/null || true' USR1
  trap 'kill -s TERM "$child" 2>/dev/null || true' TERM
  # Ctrl-C: the terminal sends SIGINT to this script and to the launcher alike (one process group), so it is not passed
  # on (that would be a second one); the script waits for the stop, or for a second Ctrl-C, and reports it.
  trap ':' INT
  while :; do  # wait returns early (> 128) when a trapped signal arrives: wait again until the launcher has exited
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  trap - USR1 TERM INT
  # A stop: the trainer exits 75, but torchrun exits 1 whatever its ranks did (and when it got the signal itself), so the
  # marker the ranks leave (STOPPED, with the step) is what tells a stop from a failure.
  if [ -f "$run_dir/STOPPED" ] || [ "$rc" -eq "$STOP_CODE" ]; then
    local at
    at=$(cat "$run_dir/STOPPED" 2>/dev/null || true)
    # A stop at step > 0 left (or resumed from) a checkpoint at that step: the rerun starts there, so check it now.
    if [[ ! $at =~ ^[0-9]+$ ]] || { [ "$at" -gt 0 ] && ! $PYTHON -m smollm2.checkpoint verify "$run_dir" "$at" >/dev/null; }; then
      echo "FAILED: $name was stopped by a signal but left no verified checkpoint at step ${at:-?} (exit $rc)" >&2
      exit 1
    fi
    echo "stopped at step $at by a signal; rerun to continue" >&2
    exit "$STOP_CODE"
  fi
  if [ "$rc" -eq 130 ]; then  # a second Ctrl-C (smollm2.errors.INTERRUPTED_EXIT_CODE)
    echo "interrupted: $name exited at once, without a checkpoint; rerun to continue from the last one" >&2
    exit 130
  fi
  if [ "$rc" -ne 0 ]; then
    echo "FAILED: $name did not complete (the trainer exited $rc); see the log above" >&2
    exit 1
  fi
  if ! $PYTHON -m smollm2.checkpoint verify "$run_dir" "$steps"; then
    echo "FAILED: $name exited 0 but left no verified checkpoint at step $steps" >&2
    exit 1
  fi
}

# The offline plot (loss, LR, gradient flow, throughput; both phases, resumes marked) on every exit from here on, a
# failure or a stop included (what the run did up to there helps most then), once anything was logged. A plot that fails
# is a warning, never the script's exit status.
draw_plot() {
  local out
  [ -s "$run_dir/metrics.jsonl" ] || return 0
  if out=$($PYTHON -m smollm2.plot "$run_dir" 2>&1); then
    echo "plot: $(tail -n 1 <<<"$out")"
  else
    echo "warning: could not draw the training plot (python -m smollm2.plot $run_dir): $(tail -n 1 <<<"$out")" >&2
  fi
}
trap draw_plot EXIT

# Both phases pass --resume latest: phase 1 then also continues after a crash or preemption when the script is rerun.
phase "phase 1" "$P1" "$@" --resume latest
phase "phase 2" "$P2" "$@" --resume latest
echo "=== both phases verified: $run_dir/checkpoints/latest is step $P2 ==="

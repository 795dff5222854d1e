# shellcheck shell=bash
# Environment for training runs; sourced by launch/train.sh and launch/slurm.sbatch.
# Helpful and free:
export CUDA_DEVICE_MAX_CONNECTIONS=1     # lets FSDP's communication kernels overlap compute in issue order
export TORCH_SHOW_CPP_STACKTRACES=1      # C++ frames in errors raised from torch internals
export PYTHONUNBUFFERED=1                # log lines appear as they happen (SLURM logs, pipes)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torchrun's default too; CPU runs may raise it
export WANDB_SILENT=${WANDB_SILENT:-true}
# NCCL, so that a hang on a cluster fails and leaves evidence. How long a collective may wait is train.dist_timeout_min
# (the config, 30 by default: a first checkpoint of the seed model on slow shared storage can take minutes).
# A failed or timed-out NCCL collective aborts the communicators and ends the rank (torchrun restarts it, srun sees it)
# instead of leaving it waiting forever:
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# The flight recorder: each rank's last 2000 collectives kept in memory (cheap), written out on a timeout, one file per
# rank under $SMOLLM2_TRACE_DIR (default ./nccl_trace). `python -m torch.distributed.flight_recorder.fr_trace nccl_trace`
# then names the collective, and the ranks, that never arrived. (TORCH_NCCL_DEBUG_INFO_TEMP_FILE: torch < 2.7's name.)
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
trace_prefix=${SMOLLM2_TRACE_DIR:-$PWD/nccl_trace}/rank_
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$trace_prefix}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$trace_prefix}
if command -v nvidia-smi >/dev/null 2>&1; then mkdir -p "$(dirname "$TORCH_FR_DUMP_TEMP_FILE")"; fi  # only NCCL writes there
# DEBUG=1: synchronous CUDA launches and device-side asserts. They make errors point at the right kernel and make
# training several times slower: never leave them on for real runs.
if [ "${DEBUG:-0}" = "1" ]; then
  export CUDA_LAUNCH_BLOCKING=1
  export TORCH_USE_CUDA_DSA=1
  export TORCH_DISTRIBUTED_DEBUG=DETAIL
  export NCCL_DEBUG=INFO
  echo "DEBUG=1: CUDA_LAUNCH_BLOCKING=1 TORCH_USE_CUDA_DSA=1 (slow!)" >&2
fi

# torchrun_flags LAUNCHER...: sets the array TORCHRUN_FLAGS (what this torchrun can do for stopping and restarting) and
# USR1_AS (the signal to pass on when a script receives SIGUSR1). Read from `LAUNCHER --help` (LAUNCHER: torchrun, or
# python -m torch.distributed.run):
#   torch >= 2.12  --signals-to-handle (forwards SIGUSR1 too) and --shutdown-timeout (the grace period) are passed.
#   torch 2.10-11  --signals-to-handle only; the grace period is fixed at 30 s (SimpleElasticAgent._shutdown's default).
#   torch <= 2.9   neither: torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT only, with 30 s. SIGUSR1 sent to a script
#                  is passed on as SIGTERM (the trainer treats both alike); SIGUSR1 sent to torchrun itself kills it.
# (TORCHELASTIC_SIGNALS_TO_HANDLE is no fallback: the versions that read it also overwrite it with the flag's value.)
# MAX_RESTARTS (default 0 here, 3 in slurm.sbatch): torchrun restarts every rank of the job this many times when one
# dies (a node's hiccup, an OOM-killed rank); the restarted ranks resume from the newest complete checkpoint (the launch
# line passes --resume latest), so nothing is lost but the steps since that checkpoint.
torchrun_flags() {
  local help
  help=$("$@" --help 2>/dev/null || true)
  TORCHRUN_FLAGS=(--max-restarts="${MAX_RESTARTS:-0}")
  USR1_AS=USR1
  # torchrun forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT by default: SIGUSR1 (SLURM's warning signal) kills it at
  # once (exit 138) and orphans the ranks, which never hear of it.
  if grep -q -- "--signals-to-handle" <<<"$help"; then
    TORCHRUN_FLAGS+=("--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
  else
    USR1_AS=TERM
  fi
  if grep -q -- "--shutdown-timeout" <<<"$help"; then
    TORCHRUN_FLAGS+=(--shutdown-timeout="${SMOLLM2_STOP_GRACE_S:-300}")
  fi
}

# shellcheck shell=bash
# Environment for training runs; sourced by launch/train.sh and launch/slurm.sbatch.
# Helpful and free:
export CUDA_DEVICE_MAX_CONNECTIONS=1     # lets FSDP's communication kernels overlap compute in issue order
export TORCH_SHOW_CPP_STACKTRACES=1      # C++ frames in errors raised from torch internals
export PYTHONUNBUFFERED=1                # log lines appear as they happen (SLURM logs, pipes)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torchrun's default too; CPU runs may raise it
export WANDB_SILENT=${WANDB_SILENT:-true}
# DEBUG=1: synchronous CUDA launches and device-side asserts. They make errors point at the right kernel and make
# training several times slower: never leave them on for real runs.
if [ "${DEBUG:-0}" = "1" ]; then
  export CUDA_LAUNCH_BLOCKING=1
  export TORCH_USE_CUDA_DSA=1
  export TORCH_DISTRIBUTED_DEBUG=DETAIL
  export NCCL_DEBUG=INFO
  echo "DEBUG=1: CUDA_LAUNCH_BLOCKING=1 TORCH_USE_CUDA_DSA=1 (slow!)" >&2
fi

"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic commit, integrity, retention, latest-good discovery.

A checkpoint is a directory `<run_dir>/checkpoints/step-000500/`:

    .metadata, __*_*.distcp    model + optimizer, sharded: every rank writes its part (DCP reshards on load)
    train_state.json           step, tokens seen, logger run id, loader state, LR-schedule settings, spike-guard window
    rng/rank-00000.pt          each rank's RNG states (CPU, CUDA, numpy, python) as plain tensors, lists and numbers
    config.yaml                the resolved config
    meta.json                  step, world size, model config, resolved config, versions, time, `final` (the run's
                               last checkpoint), `rng_format`, and the size + sha256 of each data file above
                               (checked on load: DCP itself has no checksums)
    COMPLETE                   written last

The rooms: layout.py (names, the directory listing, what counts as complete), integrity.py (digests), rng.py (the RNG
files), save.py (one save, from a temporary directory to its commit), background.py (saving while training goes on),
manager.py (the Checkpointer: choose, save, load, retention), __main__.py (`python -m smollm2.checkpoint`, which the
launch scripts use). Loading a checkpoint for inference is smollm2/serve/loading.py.
"""

from smollm2.checkpoint.integrity import file_digest, verify_files
from smollm2.checkpoint.layout import (
    COMPLETE,
    CheckpointStorage,
    checkpoint_step,
    find_latest,
    is_complete,
    list_checkpoints,
    read_meta,
    resolve,
    step_dir_name,
)

# The manager (torch, DCP) is imported on first use: `python -m smollm2.checkpoint`, which the launch scripts run before
# and after every phase, then starts without importing torch.
_MANAGER = {"Checkpointer", "ModelAndOptimizer", "ModelWeights", "check_model_matches", "load_weights"}


def __getattr__(name: str):
    if name in _MANAGER:
        from smollm2.checkpoint import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'smollm2.checkpoint' has no attribute {name!r}")


__all__ = ["COMPLETE", "CheckpointStorage", "Checkpointer", "ModelAndOptimizer", "ModelWeights", "check_model_matches",
           "checkpoint_step", "file_digest", "find_latest", "is_complete", "list_checkpoints", "load_weights", "read_meta",
           "resolve", "step_dir_name", "verify_files"]

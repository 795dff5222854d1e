"""Each rank's random number generators in a checkpoint: `rng/rank-NNNNN.pt`, restored when the world size is the same.

RNG_FORMAT (recorded in meta.json) 2: tensors, lists and numbers only, read with torch.load(weights_only=True), so a
checkpoint from elsewhere cannot run code through them. 1 (no "rng_format": checkpoints written before it): numpy's and
python's state tuples pickled as they are, which only an unrestricted unpickler reads back: such files are not read at
all (the RNG starts from the seed, with a warning), since meta.json, which says the format, is no proof of anything.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smollm2.errors import CheckpointError, one_line

RNG_FORMAT = 2


def rng_file(checkpoint_dir: Path, rank: int) -> Path:
    return checkpoint_dir / "rng" / f"rank-{rank:05d}.pt"


def rng_state() -> dict[str, Any]:
    """This rank's RNG states (CPU, CUDA, numpy, python) as tensors, lists and numbers only (RNG_FORMAT 2)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "cpu": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()`'s states; format 1 files hold numpy's and python's tuples as they are."""
    torch.set_rng_state(state["cpu"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, list):
        kind, keys, pos, has_gauss, cached_gaussian = numpy_state
        numpy_state = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian)
    np.random.set_state(numpy_state)
    python_state = state["python"]
    if isinstance(python_state, list):
        version, internal, gauss_next = python_state
        python_state = (version, tuple(internal), gauss_next)
    random.setstate(python_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_rng_file(path: Path) -> dict[str, Any]:
    """An RNG file of format 2, read with weights_only=True (plain data only)."""
    try:
        return torch.load(path, weights_only=True)
    except OSError as err:
        raise CheckpointError(f"cannot load {path}: {one_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - weights_only refuses anything but plain data (UnpicklingError)
        raise CheckpointError(f"{path} is not a trusted checkpoint format ({one_line(err)}): reading it could run code "
                              "from the file, so it is refused") from None


def load_rng(checkpoint_dir: Path, meta: dict[str, Any], rank: int, world_size: int) -> None:
    """Restore this rank's RNG from the checkpoint if it was saved at this world size (at another, each rank's streams
    start from the seed)."""
    path = rng_file(checkpoint_dir, rank)
    if meta.get("world_size") != world_size or not path.is_file():
        return
    if meta.get("rng_format", 1) < RNG_FORMAT:
        if rank == 0:
            print(f"warning: {checkpoint_dir}'s RNG files are of the older pickled format, which is not read (it could "
                  "run code): the random streams start from the seed", file=sys.stderr, flush=True)
        return
    state = read_rng_file(path)
    try:
        set_rng_state(state)
    except Exception as err:  # noqa: BLE001 - plain data, but not RNG states: say which file
        raise CheckpointError(f"cannot load {path}: {one_line(err)}") from None

"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic commit, validation, retention, latest-good discovery.

A checkpoint is a directory `<run_dir>/checkpoints/step-000500/`:

    .metadata, __*_*.distcp    model + optimizer, sharded: every rank writes its part (DCP reshards on load)
    train_state.json           step, tokens seen, logger run id, loader state, LR-schedule settings
    rng/rank-00000.pt          each rank's RNG states (CPU, CUDA, numpy, python)
    meta.json                  step, world size, model config, resolved config, versions, time, and the size +
                               sha256 of each file above it (checked on load: DCP itself has no checksums)
    COMPLETE                   written last

It is written as `.tmp-step-000500/` and renamed only after every rank has finished, so a crash mid-save never leaves
anything that looks complete; `latest` (a symlink, and `find_latest`, which scans) means the newest complete one.

Command line (launch/*.sh use it, so no script parses config files or step-NNNNNN names itself):

    python -m smollm2.checkpoint verify RUN_DIR STEP             exit 0 iff a complete, undamaged checkpoint is at STEP
    python -m smollm2.checkpoint list RUN_DIR                    the complete checkpoints, oldest first
    python -m smollm2.checkpoint latest-step RUN_DIR             the newest complete one's step (exit 2 if there is none)
    python -m smollm2.checkpoint run-dir CONFIG [key=value ...]  the resolved train.run_dir of a config + overrides
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import smollm2
from smollm2.config import Config, load_config, model_config_from_dict, to_dict, to_yaml
from smollm2.errors import CheckpointError
from smollm2.files import atomic_write_json, sha256_file

STEP_DIR = re.compile(r"^step-(\d{6,})$")
COMPLETE = "COMPLETE"
# Model settings that do not change the parameters' shapes or meaning (free to differ on resume).
# max_seq_len: no tensor depends on it (RoPE angles are computed per position), so a resume may raise or lower it.
_RUNTIME_MODEL_KEYS = {"attention", "init_std", "max_seq_len"}


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint directory (`.../step-000500` -> 500; a `latest` symlink -> its target's step)."""
    path = Path(path)
    match = STEP_DIR.match(path.name) or STEP_DIR.match(path.resolve().name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a step-NNNNNN name)")
    return int(match.group(1))


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "meta.json").is_file() and (path / ".metadata").is_file()


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ckpt_root, oldest first."""
    found = []
    if ckpt_root.is_dir():
        for child in ckpt_root.iterdir():
            match = STEP_DIR.match(child.name)
            if match and child.is_dir() and not child.is_symlink() and is_complete(child):
                found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def resolve(spec: str, ckpt_root: Path) -> Path | None:
    """`latest` -> the newest complete checkpoint under ckpt_root (None if there is none yet); a path -> that checkpoint
    (a run directory or a checkpoints directory means its latest). Raises CheckpointError for a bad path."""
    if spec == "latest":
        return find_latest(ckpt_root)
    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.name == "latest" or not (path / ".metadata").exists():
        for root in (path, path / "checkpoints", path.parent if path.name == "latest" else None):
            if root is not None and (latest := find_latest(root)) is not None:
                return latest
        if not (path / ".metadata").exists():
            raise CheckpointError(f"{path} holds no complete checkpoint (expected a step-NNNNNN directory)")
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker: a save was interrupted)")
    return path.resolve()


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}/meta.json is unreadable: {err}") from None


def check_model_matches(meta: dict[str, Any], cfg: Config, path: Path) -> None:
    saved, current = meta.get("model", {}), to_dict(cfg.model)
    diffs = [f"model.{k}: checkpoint {saved[k]!r}, config {current[k]!r}" for k in current
             if k in saved and k not in _RUNTIME_MODEL_KEYS and saved[k] != current[k]]
    if diffs:
        raise CheckpointError(f"{path} was written for another model shape ({'; '.join(diffs)}); "
                              "resume with the same model config or start a new run_dir")


# ------------------------------------------------------------------------------------------------------------ integrity
# DCP keeps no checksums: a shard damaged in place (a bad disk, an interrupted copy) loads without an error, its bytes
# silently becoming weights. So the save records each data file's size and sha256 in meta.json, and a load checks them.


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _data_files(path: Path) -> list[str]:
    """The files of a checkpoint that the save writes before meta.json: DCP's .metadata and shards, the ranks' RNG."""
    return sorted([".metadata", *(p.name for p in path.glob("*.distcp")), *(f"rng/{p.name}" for p in path.glob("rng/*.pt"))])


def _gather(part: Any, world_size: int) -> list[Any]:
    if world_size > 1 and dist.is_initialized():
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, part)
        return parts
    return [part]


def record_files(path: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """Collective when world_size > 1: the digests of the checkpoint's data files (`file_digest`), each rank hashing a
    share of them. Rank 0 lists the files (it is the one that commits the directory)."""
    names = [_data_files(path) if rank == 0 else None]
    if world_size > 1 and dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    mine = {name: file_digest(path / name) for name in names[0][rank::world_size]}
    return dict(sorted(item for part in _gather(mine, world_size) for item in part.items()))


def verify_files(path: Path, meta: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
    """Collective when world_size > 1: check the data files against the digests meta.json recorded at save time, each
    rank hashing a share; every rank raises the same CheckpointError if any differs. Checkpoints saved before digests
    were recorded pass unchecked."""
    recorded = meta.get("files")
    if not recorded:
        return
    problems = []
    for name in sorted(recorded)[rank::world_size]:
        expected, file = recorded[name], path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif (size := file.stat().st_size) != expected["bytes"]:
            problems.append(f"{name} has {size:,} bytes, {expected['bytes']:,} were written")
        elif file_digest(file)["sha256"] != expected["sha256"]:
            problems.append(f"{name} has changed since it was written (sha256 differs)")
    problems = [problem for part in _gather(problems, world_size) for problem in part]
    if problems:
        # Every rank raises now. Torn down straight after the gather, the group sometimes aborts a rank on exit ("terminate
        # called without an active exception"; at 2 gloo ranks 4 runs in 18 without this barrier, 1 in 30 with it).
        _barrier()
        raise CheckpointError(f"{path} is damaged: {'; '.join(problems)}; resume from another checkpoint "
                              "(python -m smollm2.checkpoint list RUN_DIR)")


def _load_failure(path: Path, err: BaseException) -> CheckpointError:
    """What DCP raised, as one line naming the checkpoint. Its CheckpointException (a BaseException, so `except
    Exception` misses it) wraps each rank's error and prints their tracebacks: report the first rank's error."""
    failures = getattr(err, "failures", None)
    if isinstance(err, CheckpointException) and failures:
        err = next(iter(failures.values()))[0]
    lines = str(err).strip().splitlines()
    detail = lines[0][:300] if lines else "no message (a truncated or damaged file?)"
    return CheckpointError(f"cannot load {path}: {type(err).__name__}: {detail}")


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    def __init__(self, ckpt_root: str | Path, keep_last: int, rank: int, world_size: int):
        self.root = Path(ckpt_root)
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size

    # ------------------------------------------------------------------------------------------------------------ save

    def save(self, step: int, model, optimizer, train_state: dict[str, Any], cfg: Config) -> Path:
        """Collective: every rank calls it. Returns the committed directory."""
        final = self.root / step_dir_name(step)
        if is_complete(final):  # e.g. resumed at this very step: nothing new to write
            return final
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a save that was killed
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        torch.save(_rng_state(), tmp / "rng" / f"rank-{self.rank:05d}.pt")
        _barrier()
        files = record_files(tmp, self.rank, self.world_size)  # collective
        if self.rank == 0:
            atomic_write_json(tmp / "train_state.json", train_state)
            (tmp / "config.yaml").write_text(to_yaml(cfg))
            atomic_write_json(tmp / "meta.json", {
                "step": step, "world_size": self.world_size, "model": to_dict(cfg.model), "config": to_dict(cfg),
                "files": files,
                "versions": {"smollm2": smollm2.__version__, "torch": torch.__version__,
                             "python": sys.version.split()[0]},
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
            (tmp / COMPLETE).write_text(f"{step}\n")
            os.rename(tmp, final)  # the commit
            self._point_latest(final)
            self._prune()
        _barrier()
        return final

    def _point_latest(self, target: Path) -> None:
        link, tmp_link = self.root / "latest", self.root / ".latest.tmp"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        tmp_link.symlink_to(target.name)
        os.replace(tmp_link, link)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _, path in list_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------------------ load

    def load(self, path: Path, model, optimizer, cfg: Config) -> dict[str, Any]:
        """Collective. Restores model + optimizer (resharded to this world size) and this rank's RNG when the world size
        matches; returns the train state (step, tokens, loader state, ...)."""
        meta = read_meta(path)
        check_model_matches(meta, cfg, path)
        verify_files(path, meta, self.rank, self.world_size)  # collective
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=path)
        except (Exception, CheckpointException) as err:  # DCP raises assorted errors for damaged/foreign files
            raise _load_failure(path, err) from None
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        try:
            train_state = json.loads((path / "train_state.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}/train_state.json is unreadable: {err}") from None
        rng_file = path / "rng" / f"rank-{self.rank:05d}.pt"
        if meta.get("world_size") == self.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
        return train_state


# --------------------------------------------------------------------------------------------------------- inference


def load_model_for_inference(spec: str | Path, device: torch.device | str = "cpu"):
    """(model, config, step) from a checkpoint, in one process, without a process group: for generate and export."""
    from smollm2.model import SmolLM

    path = resolve(str(spec), Path(spec))
    if path is None:
        raise CheckpointError(f"no complete checkpoint under {spec}")
    meta = read_meta(path)
    verify_files(path, meta)
    cfg = load_config(path / "config.yaml") if (path / "config.yaml").is_file() else Config()
    cfg.model = model_config_from_dict(meta["model"])
    model = SmolLM(cfg.model)
    state = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path, no_dist=True)
    except (Exception, CheckpointException) as err:
        raise _load_failure(path, err) from None
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg, int(meta["step"])


# --------------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm2.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="exit 0 iff a complete, undamaged checkpoint exists at STEP")
    verify.add_argument("run_dir")
    verify.add_argument("step", type=int)
    listing = sub.add_parser("list", help="list the complete checkpoints of a run")
    listing.add_argument("run_dir")
    latest_step = sub.add_parser("latest-step", help="print the step of the newest complete checkpoint (exit 2 if none)")
    latest_step.add_argument("run_dir")
    run_dir = sub.add_parser("run-dir", help="print the train.run_dir that CONFIG with these overrides resolves to")
    run_dir.add_argument("config")
    run_dir.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.command == "run-dir":
        print(load_config(args.config, args.overrides).train.run_dir)  # ConfigError -> one line, exit 2
        return 0
    root = Path(args.run_dir) / "checkpoints"
    if args.command == "list":
        for step, path in list_checkpoints(root):
            meta = read_meta(path)
            print(f"{step:>8}  {path}  world_size={meta.get('world_size')}  {meta.get('time')}")
        return 0
    if args.command == "latest-step":
        found = list_checkpoints(root)
        if not found:
            raise CheckpointError(f"no complete checkpoint under {root}")
        print(found[-1][0])
        return 0
    path = root / step_dir_name(args.step)
    if not is_complete(path):
        raise CheckpointError(f"no complete checkpoint at step {args.step} ({path})")
    meta = read_meta(path)
    if meta.get("step") != args.step:
        raise CheckpointError(f"{path}/meta.json records step {meta.get('step')}, expected {args.step}")
    verify_files(path, meta)  # every file's size and sha256 as written
    latest = find_latest(root)
    print(f"ok: {path} (step {meta['step']}, world size {meta['world_size']}, latest = {latest.name if latest else None})")
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)

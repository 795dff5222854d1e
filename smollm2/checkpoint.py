"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic commit, validation, retention, latest-good discovery.

A checkpoint is a directory `<run_dir>/checkpoints/step-000500/`:

    .metadata, __*_*.distcp    model + optimizer, sharded: every rank writes its part (DCP reshards on load)
    train_state.json           step, tokens seen, logger run id, loader state, LR-schedule settings
    rng/rank-00000.pt          each rank's RNG states (CPU, CUDA, numpy, python) as plain tensors, lists and numbers
    config.yaml                the resolved config
    meta.json                  step, world size, model config, resolved config, versions, time, `final` (the run's
                               last checkpoint), `rng_format`, and the size + sha256 of each data file above
                               (checked on load: DCP itself has no checksums)
    COMPLETE                   written last

It is written as `.tmp-step-000500/` and renamed only after every rank has finished, every file and then the directory
fsynced, so neither a crash mid-save nor a power loss after it leaves anything that looks complete and is not; `latest`
(a symlink, and `find_latest`, which scans) means the newest complete one.

On a cluster the ranks share the directory over a network filesystem, whose listings can differ between nodes for a
while (NFS caches them; a requeued job can start before they expire). So whatever depends on what the directory holds
(which checkpoint to resume from, whether a step is already saved, pruning) is decided by rank 0 and broadcast, and every
failure reaches all ranks as the same one-line CheckpointError: no rank is left waiting in a collective for one that
raised.

Retention: checkpoints at multiples of `keep_every` and each run's final one are kept forever; only the others rotate
under `keep_last`.

Command line (launch/*.sh use it, so no script parses config files or step-NNNNNN names itself):

    python -m smollm2.checkpoint verify RUN_DIR STEP             exit 0 iff a complete, undamaged checkpoint is at STEP
    python -m smollm2.checkpoint list RUN_DIR                    the complete checkpoints, oldest first
    python -m smollm2.checkpoint latest-step RUN_DIR             the newest complete one's step (exit 2 if there is none)
    python -m smollm2.checkpoint run-dir CONFIG [key=value ...]  the resolved train.run_dir of a config + overrides
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import smollm2
from smollm2.config import Config, load_config, model_config_from_dict, to_dict, to_yaml
from smollm2.errors import CheckpointError, UserError
from smollm2.files import atomic_write_json, sha256_file

STEP_DIR = re.compile(r"^step-(\d{6,})$")
COMPLETE = "COMPLETE"
# The layout of rng/*.pt, recorded in meta.json. 2: tensors, lists and numbers only, read with torch.load(weights_only=True),
# so a checkpoint from elsewhere cannot run code through them. 1 (no "rng_format": checkpoints written before it): numpy's
# and python's state tuples pickled as they are, which only weights_only=False reads back (allowed for those alone).
RNG_FORMAT = 2
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
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


def is_final(path: Path) -> bool:
    """Whether meta.json marks the checkpoint as a run's final one (train.max_steps reached): never pruned."""
    try:
        return json.loads((path / "meta.json").read_text()).get("final") is True
    except (OSError, ValueError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------------------------ integrity
# DCP keeps no checksums: a shard damaged in place (a bad disk, an interrupted copy) loads without an error, its bytes
# silently becoming weights. So the save records each data file's size and sha256 in meta.json, and a load checks them.
# sha256 costs 0.6-0.9 s per GB (1.1-1.7 GB/s) on one core of this project's CPU machines, measured at the seed shape
# (README, "Checkpoints and resuming"): a fraction of writing the GB, so no faster checksum is worth a second format.


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _written_files(metadata: Any, world_size: int) -> list[str]:
    """The data files a save wrote, from what DCP's save returned (the same on every rank), not from a listing of the
    directory, which on a network filesystem may not show another node's files yet: .metadata, the shards, the RNG."""
    shards = {info.relative_path for info in (getattr(metadata, "storage_data", None) or {}).values()
              if getattr(info, "relative_path", None)}
    return sorted({".metadata", *shards, *(f"rng/rank-{rank:05d}.pt" for rank in range(world_size))})


def _gather(part: Any, world_size: int, group=None) -> list[Any]:
    if world_size > 1 and dist.is_initialized():
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, part, group=group)
        return parts
    return [part]


def file_problems(path: Path, recorded: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """What differs between the files `names` of the checkpoint at `path` and the digests meta.json recorded (local: this
    process reads them)."""
    problems = []
    for name in names:
        expected, file = recorded[name], path / name
        try:
            if not file.is_file():
                problems.append(f"{name} is missing")
            elif (size := file.stat().st_size) != expected["bytes"]:
                problems.append(f"{name} has {size:,} bytes, {expected['bytes']:,} were written")
            elif file_digest(file)["sha256"] != expected["sha256"]:
                problems.append(f"{name} has changed since it was written (sha256 differs)")
        except OSError as err:
            problems.append(f"{name} is unreadable ({err.strerror or err})")
    return problems


def _damaged(path: Path, problems: list[str]) -> CheckpointError:
    return CheckpointError(f"{path} is damaged: {'; '.join(problems)}; resume from another checkpoint "
                           "(python -m smollm2.checkpoint list RUN_DIR)")


def verify_files(path: Path, meta: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
    """Collective when world_size > 1: check the data files against the digests meta.json recorded at save time, each
    rank hashing a share; every rank raises the same CheckpointError if any differs. Checkpoints saved before digests
    were recorded pass unchecked."""
    recorded = meta.get("files")
    if not recorded:
        return
    problems = file_problems(path, recorded, sorted(recorded)[rank::world_size])
    problems = [problem for part in _gather(problems, world_size) for problem in part]
    if problems:
        # Every rank raises now. Torn down straight after the gather, the group sometimes aborts a rank on exit ("terminate
        # called without an active exception"; at 2 gloo ranks 4 runs in 18 without this barrier, 1 in 30 with it).
        _barrier()
        raise _damaged(path, problems)


def _root_cause(err: BaseException) -> BaseException:
    """DCP's CheckpointException (a BaseException, so `except Exception` misses it) wraps each rank's error: the first
    rank's; any other error: itself."""
    failures = getattr(err, "failures", None)
    if isinstance(err, CheckpointException) and failures:
        return next(iter(failures.values()))[0]
    return err


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else 'no message'}"


def _load_failure(path: Path, err: BaseException) -> CheckpointError:
    """What DCP raised, as one line naming the checkpoint (the first rank's error, not every rank's traceback)."""
    err = _root_cause(err)
    lines = str(err).strip().splitlines()
    detail = lines[0][:300] if lines else "no message (a truncated or damaged file?)"
    return CheckpointError(f"cannot load {path}: {type(err).__name__}: {detail}")


# ---------------------------------------------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors, lists and numbers only (RNG_FORMAT 2): torch.load(weights_only=True) reads
    them back, and refuses anything that could run code."""
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


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore `_rng_state()`'s states; format 1 files hold numpy's and python's tuples as they are."""
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


# ---------------------------------------------------------------------------------------------------------- durability


def _write_synced(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Create `path` with `write(file)`, then fsync it: on disk before the directory is committed."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make the directory's entries durable (files created or renamed in it): fsyncing a file does not cover its name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot fsync a directory say so
            raise
    finally:
        os.close(fd)


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Checkpointer:
    """A run's checkpoints. `choose`, `save` and `load` are collective: all ranks call them, in the same order."""

    def __init__(self, ckpt_root: str | Path, keep_last: int, rank: int, world_size: int, keep_every: int = 0,
                 async_save: bool = False):
        self.root = Path(ckpt_root)
        self.keep_last, self.keep_every, self.rank, self.world_size = keep_last, keep_every, rank, world_size
        self.async_save = async_save
        # The collectives of the save and commit running in the background use a group of their own (gloo: DCP plans on
        # the CPU): two threads' collectives on one group could interleave differently on different ranks.
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self._pending: _PendingSave | None = None
        self._stager = _host_stager() if async_save else None

    # -------------------------------------------------------------------------------------------- agreeing ranks

    def _from_rank0(self, decide: Callable[[], Any], group=None) -> Any:
        """Rank 0 runs `decide` and every rank returns its result, or raises its error: a CheckpointError with the same
        message on every rank (rank 0 re-raises an error that is not a UserError as it is, with its traceback)."""
        result, error, user, failure = None, None, True, None
        if self.rank == 0:
            try:
                result = decide()
            except Exception as err:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
                failure, user = err, isinstance(err, UserError)
                error = str(err) if user else f"rank 0: {_one_line(err)}"
        if self.world_size > 1 and dist.is_initialized():
            shared = [result, error, user]
            dist.broadcast_object_list(shared, src=0, group=group)
            result, error, user = shared
        if error is None:
            return result
        _barrier(group)  # see verify_files: every rank has the message before any tears the group down
        if failure is not None and not isinstance(failure, CheckpointError):
            raise failure
        raise (CheckpointError if user else RuntimeError)(error)

    def _together(self, work: Callable[[], Any], cleanup: Callable[[], None] | None = None, group=None) -> list[Any]:
        """Every rank runs `work`; returns the results by rank. If it failed on any rank, rank 0 runs `cleanup` (every rank
        is past `work` then) and every rank raises the lowest failing rank's error as a CheckpointError (a UserError
        there) or a RuntimeError (a bug, whose traceback that rank keeps as the cause)."""
        result, error, user, failure = None, None, True, None
        try:
            result = work()
        except (Exception, CheckpointException) as err:  # DCP's CheckpointException is a BaseException
            failure, user = err, isinstance(err, UserError)
            error = str(err) if user else _one_line(_root_cause(err))
        outcomes = _gather((result, error, user), self.world_size, group)
        failed = [(rank, error, user) for rank, (_, error, user) in enumerate(outcomes) if error is not None]
        if not failed:
            return [result for result, _, _ in outcomes]
        if cleanup is not None and self.rank == 0:
            cleanup()
        _barrier(group)
        rank, error, user = failed[0]
        if user:
            raise CheckpointError(error) from failure
        raise RuntimeError(f"rank {rank}: {error}") from failure

    # ---------------------------------------------------------------------------------------------------- resume

    def choose(self, spec: str | None) -> Path | None:
        """Collective: the checkpoint to resume from, the same on every rank: rank 0 looks at the directory and checks
        the checkpoint's files against meta.json, then broadcasts its choice (a stale directory cache on one node must
        not make ranks load different checkpoints).

        spec None (no --resume): None, or a CheckpointError if the run directory already holds checkpoints.
        `latest`: the newest complete checkpoint whose files check out, a damaged one skipped with a warning naming the
        file; None if there is none yet. A path (see `resolve`): that checkpoint; damaged, it is an error naming the file.
        `load(..., verified=True)` then skips checking the files a second time."""
        chosen = self._from_rank0(lambda: self._choose(spec))
        return None if chosen is None else Path(chosen)

    def _choose(self, spec: str | None) -> str | None:  # rank 0
        if not spec:
            if (existing := find_latest(self.root)) is not None:
                restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
                hint = " (torchrun restarted the ranks: with it in the launch line, a restart continues)" if restarted else ""
                raise CheckpointError(f"{self.root.parent} already holds checkpoints (latest: {existing.name}); pass "
                                      f"--resume latest to continue that run{hint}, or set a new train.run_dir")
            return None
        if spec == "latest":
            found = list_checkpoints(self.root)
            for _, path in reversed(found):
                if not (problems := self._problems(path)):
                    return str(path)
                _warn(f"skipping {path}: {'; '.join(problems)}; trying the checkpoint before it")
            if found:
                raise CheckpointError(f"every checkpoint under {self.root} is damaged (see the warnings above); restore "
                                      "one from a copy, or start a new train.run_dir")
            return None
        path = resolve(spec, self.root)
        if problems := self._problems(path):
            raise _damaged(path, problems)
        return str(path)

    @staticmethod
    def _problems(path: Path) -> list[str]:
        """What is wrong with a complete-looking checkpoint: an unreadable meta.json, or files that differ from it."""
        try:
            recorded = read_meta(path).get("files") or {}
        except CheckpointError as err:
            return [str(err)]
        return file_problems(path, recorded, sorted(recorded))

    # ------------------------------------------------------------------------------------------------------ save

    def save(self, step: int, model, optimizer, train_state: dict[str, Any], cfg: Config, final: bool = False) -> Path:
        """Collective: every rank calls it. Returns the directory the checkpoint is (or, saving in the background, will
        be) committed as. `final`: the run's last checkpoint (train.max_steps reached), kept forever like the multiples
        of keep_every.

        A failure (a full disk, a quota, permissions) on any rank raises the same one-line CheckpointError on every
        rank; the unfinished `.tmp-step-*` directory is removed and the previous checkpoint stays the latest. With
        `async_save`, this returns once the state is copied to host memory; the files are written, checked and
        committed by a background thread, and its failure is raised by the next `save` or by `wait`."""
        self.wait()  # one save at a time: the previous one is committed (or has failed) before this one starts
        target = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        # Decided by rank 0 alone: a rank that (through a stale cache) saw the step as saved would skip the collectives
        # below while the others waited in them.
        done, previous = self._from_rank0(lambda: self._prepare(step, target, tmp, final))
        if done:
            return target
        save = _SaveJob(self, step, target, tmp, previous, train_state, cfg, final)
        if not self.async_save:
            save.finish(self._together(save.failing_as(lambda: self._write(tmp, model, optimizer)), save.remove_tmp))
            return target
        # The blocking part: every rank copies its shards to host memory and starts writing them in the background.
        futures: list = []  # this rank's write (not gathered: a future does not pickle)
        self._together(save.failing_as(lambda: futures.append(self._start_write(tmp, model, optimizer))), save.remove_tmp)
        self._pending = _PendingSave(save, futures[0])
        return target

    def wait(self) -> Path | None:
        """Collective with `async_save`: wait until the background save (if any) is committed; returns its directory.
        Raises its failure (the same CheckpointError on every rank). Without `async_save`, nothing to wait for."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.result()

    def _start_write(self, tmp: Path, model, optimizer):  # every rank
        """Stage this rank's shards in host memory and write them from a background thread (DCP's async save, on the
        checkpoint's own group); the RNG file, a few KB, is written now."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        stager = {} if self._stager is None else {"async_stager": self._stager}
        future = dcp.async_save({"model": model_sd, "optim": optim_sd}, process_group=self._group,
                                storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), **stager)
        future = getattr(future, "upload_completion", future)  # torch >= 2.9 with async staging returns both futures
        _write_synced(tmp / "rng" / f"rank-{self.rank:05d}.pt", lambda f: torch.save(_rng_state(), f))
        return future

    def _prepare(self, step: int, target: Path, tmp: Path, final: bool) -> tuple[bool, str | None]:  # rank 0
        """(whether `target` is already saved, e.g. resumed at this very step; the newest complete checkpoint, which is
        what a failed save leaves as the latest), after making a fresh `tmp`."""
        if is_complete(target):
            if final and not is_final(target):  # the same state, now also this run's final checkpoint: keep it
                try:
                    atomic_write_json(target / "meta.json", {**read_meta(target), "final": True})  # no digest covers it
                    _fsync_dir(target)
                except (OSError, CheckpointError) as err:
                    _warn(f"could not mark {target} as the run's final checkpoint ({err}): keep_last may rotate it out")
            return True, None
        previous = find_latest(self.root)
        try:
            for leftover in (tmp, target):  # a save that was killed; an incomplete copy at this step's name
                if leftover.exists():
                    shutil.rmtree(leftover)
            (tmp / "rng").mkdir(parents=True)
        except OSError as err:
            raise self._save_error(step, target, None if previous is None else str(previous), err) from err
        return False, None if previous is None else str(previous)

    def _write(self, tmp: Path, model, optimizer) -> list[str]:  # every rank
        """Write this rank's shards (DCP) and RNG states into `tmp`; returns the data files every rank wrote."""
        model_sd, optim_sd = get_state_dict(model, optimizer)
        # sync_files (DCP's default, pinned here) fsyncs every shard and .metadata before the save returns.
        written = dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
        _write_synced(tmp / "rng" / f"rank-{self.rank:05d}.pt", lambda f: torch.save(_rng_state(), f))
        return _written_files(written, self.world_size)

    def _commit(self, tmp: Path, target: Path, train_state: dict[str, Any], cfg: Config, meta: dict[str, Any],
                remove_tmp: Callable[[], None]) -> None:  # rank 0
        try:
            atomic_write_json(tmp / "train_state.json", train_state)  # fsyncs
            _write_synced(tmp / "config.yaml", lambda f: f.write(to_yaml(cfg).encode()))
            atomic_write_json(tmp / "meta.json", meta)
            _write_synced(tmp / COMPLETE, lambda f: f.write(f"{meta['step']}\n".encode()))
            _fsync_dir(tmp / "rng")
            _fsync_dir(tmp)  # every name in it is durable before the rename publishes them
            os.rename(tmp, target)  # the commit
            _fsync_dir(self.root)  # the rename itself
        except BaseException:
            if not target.exists():
                remove_tmp()
            raise
        # Committed: nothing below fails the save. `latest` (the link) is a convenience: --resume latest scans.
        try:
            self._point_latest(target)
            _fsync_dir(self.root)
        except OSError as err:
            _warn(f"could not point {self.root / 'latest'} at {target.name} ({err.strerror or err}); "
                  "--resume latest scans the directory and is not affected")
        self._prune()

    def _save_error(self, step: int, target: Path, previous: str | None, err: OSError) -> CheckpointError:
        kept = (f"the previous checkpoint step {checkpoint_step(previous)} is intact ({previous})" if previous
                else "there is no earlier checkpoint")
        if err.errno in _DISK_FULL:
            return CheckpointError(f"disk full while saving step {step} to {target}; {kept}; free space (or lower "
                                   "checkpoint.keep_last / keep_every), then --resume latest")
        where = f" ({err.filename})" if err.filename else ""
        return CheckpointError(f"cannot save step {step} to {target}: {err.strerror or err}{where}; {kept}")

    def _point_latest(self, target: Path) -> None:
        link, tmp_link = self.root / "latest", self.root / ".latest.tmp"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        tmp_link.symlink_to(target.name)
        os.replace(tmp_link, link)

    def kept_forever(self, step: int, path: Path) -> bool:
        """Milestones (multiples of keep_every) and each run's final checkpoint: a later phase's preemption saves must
        not rotate them out (launch/train.sh, rerun, checks phase 1's final step again)."""
        return (self.keep_every > 0 and step % self.keep_every == 0) or is_final(path)

    def _prune(self) -> None:  # rank 0
        if self.keep_last <= 0:
            return
        rotating = [path for step, path in list_checkpoints(self.root) if not self.kept_forever(step, path)]
        for path in rotating[: -self.keep_last]:
            # the marker first: a deletion cut short leaves an incomplete directory, never a complete-looking damaged one
            (path / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------------ load

    def load(self, path: Path, model, optimizer, cfg: Config, verified: bool = False) -> dict[str, Any]:
        """Collective. Restores model + optimizer (resharded to this world size) and this rank's RNG when the world size
        matches; returns the train state (step, tokens, loader state, ...). `verified`: `choose` has just checked the
        files, skip the second pass (otherwise the ranks check them, each a share)."""
        meta = self._from_rank0(lambda: read_meta(path))  # one reading, so every rank decides alike below
        check_model_matches(meta, cfg, path)
        if not verified:
            verify_files(path, meta, self.rank, self.world_size)  # collective
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=path)  # collective: DCP shares its failures between the ranks
        except (Exception, CheckpointException) as err:  # DCP raises assorted errors for damaged/foreign files
            raise _load_failure(path, err) from None
        how = [{k: group[k] for k in _UPDATE_IMPLEMENTATION if k in group} for group in optimizer.param_groups]
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        for group, flags in zip(optimizer.param_groups, how):  # this run's choice (optim.fused, the device), not the
            group.update(flags)  # checkpoint's: a GPU run's fused update resumed on CPU runs as configured there
        train_state = self._from_rank0(lambda: _read_train_state(path))
        self._together(lambda: self._load_rng(path, meta))
        return train_state

    def _load_rng(self, path: Path, meta: dict[str, Any]) -> None:  # every rank
        rng_file = path / "rng" / f"rank-{self.rank:05d}.pt"
        if meta.get("world_size") != self.world_size or not rng_file.is_file():
            return  # another world size: each rank's stream starts from the seed
        try:
            # Format 1 files (older checkpoints, meta.json without "rng_format") are plain pickles: only they may
            # unpickle objects, so that old runs still resume.
            _set_rng_state(torch.load(rng_file, weights_only=meta.get("rng_format", 1) >= 2))
        except Exception as err:  # noqa: BLE001 - an unreadable or foreign file: say which
            raise CheckpointError(f"cannot load {rng_file}: {_one_line(err)}") from None


# Optimizer param-group keys that say how the update runs, not what it computes: loading keeps the running optimizer's.
_UPDATE_IMPLEMENTATION = ("foreach", "fused", "capturable")


def _host_stager():
    """One host copy of the state, reused by every save (the first allocates it, the next ones copy into it; pinned on
    CUDA, for fast device-to-host copies). None where torch has no DefaultStager (< 2.9): DCP then allocates a copy
    per save."""
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:
        return None
    return DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=False))


class _SaveJob:
    """One checkpoint save after its data files are written: every rank hashes a share of them, then rank 0 writes
    meta.json (sizes and digests), train_state.json, config.yaml and COMPLETE, and renames the directory (the commit).
    In the foreground (sync), or on the background thread (async, its collectives on the checkpointer's own group)."""

    def __init__(self, ckpt: Checkpointer, step: int, target: Path, tmp: Path, previous: str | None,
                 train_state: dict[str, Any], cfg: Config, final: bool):
        self.ckpt, self.step, self.target, self.tmp, self.previous = ckpt, step, target, tmp, previous
        self.train_state, self.cfg, self.final = train_state, cfg, final

    def failing_as(self, work: Callable[[], Any]) -> Callable[[], Any]:
        """`work`, its OSError (DCP's wrapped in a CheckpointException) raised as the save's one-line error."""
        def run() -> Any:
            try:
                return work()
            except (Exception, CheckpointException) as err:
                if isinstance(cause := _root_cause(err), OSError):
                    raise self.ckpt._save_error(self.step, self.target, self.previous, cause) from err
                raise
        return run

    def remove_tmp(self) -> None:  # best effort: a leftover is removed by the next save at this step anyway
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self, names_by_rank: list[list[str]], group=None) -> Path:
        ckpt, tmp = self.ckpt, self.tmp
        names = names_by_rank[ckpt.rank]
        shares = ckpt._together(self.failing_as(lambda: {name: file_digest(tmp / name)
                                                         for name in names[ckpt.rank :: ckpt.world_size]}),
                                self.remove_tmp, group)
        files = dict(sorted(item for share in shares for item in share.items()))
        meta = {"step": self.step, "world_size": ckpt.world_size, "final": self.final, "rng_format": RNG_FORMAT,
                "model": to_dict(self.cfg.model), "config": to_dict(self.cfg), "files": files,
                "versions": {"smollm2": smollm2.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        ckpt._from_rank0(self.failing_as(lambda: ckpt._commit(tmp, self.target, self.train_state, self.cfg, meta,
                                                              self.remove_tmp)), group)
        return self.target


class _PendingSave:
    """A save writing in the background: the thread waits for this rank's DCP write, then every rank's (a collective on
    the checkpointer's group), then finishes the save (hashes, commit). `result()` joins it and raises what failed."""

    def __init__(self, job: _SaveJob, future):
        self.job, self.future = job, future
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"checkpoint-{job.step}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        job, ckpt = self.job, self.job.ckpt
        try:
            def written() -> list[str]:
                return _written_files(self.future.result(), ckpt.world_size)
            names = ckpt._together(job.failing_as(written), job.remove_tmp, ckpt._group)
            job.finish(names, ckpt._group)
        except BaseException as err:  # noqa: BLE001 - raised in the training thread by result()
            self.error = err

    def result(self) -> Path:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.job.target


def _read_train_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "train_state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}/train_state.json is unreadable: {err}") from None


# --------------------------------------------------------------------------------------------------------- inference


def load_model_for_inference(spec: str | Path, device: torch.device | str = "cpu"):
    """(model, config, step) from a checkpoint, in one process, without a process group: for generate and export.
    A `python -m smollm2.export --format safetensors` folder is accepted too."""
    from smollm2.model import SmolLM

    if is_safetensors_export(Path(spec)):
        return _load_safetensors_export(Path(spec), device)
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


def is_safetensors_export(path: Path) -> bool:
    """A `python -m smollm2.export --format safetensors` folder (what load_model_for_inference reads besides DCP)."""
    return (path / "model.safetensors").is_file() and (path / "config.yaml").is_file()


def _load_safetensors_export(path: Path, device):
    """A `python -m smollm2.export --format safetensors` folder: our names, the padded table, the run's config."""
    from safetensors.torch import load_file

    from smollm2.model import SmolLM

    cfg = load_config(path / "config.yaml")
    model = SmolLM(cfg.model)
    try:
        missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    except Exception as err:  # noqa: BLE001 - a damaged file (SafetensorError), shapes of another config (RuntimeError)
        raise CheckpointError(f"cannot load {path / 'model.safetensors'}: {_one_line(err)}") from None
    if unexpected or set(missing) - {"head.weight"}:  # the tied head is the embedding, stored once
        raise CheckpointError(f"{path / 'model.safetensors'} does not fit its config.yaml: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]} (of {len(missing)}, {len(unexpected)})")
    info = path / "smollm2_export.json"
    step = int(json.loads(info.read_text())["step"]) if info.is_file() else 0
    return model.to(device).eval(), cfg, step


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
            final = "  final" if meta.get("final") is True else ""
            print(f"{step:>8}  {path}  world_size={meta.get('world_size')}  {meta.get('time')}{final}")
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

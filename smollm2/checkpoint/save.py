"""One checkpoint save, from a fresh temporary directory to its commit: the procedure both the foreground and the
background save (smollm2/checkpoint/background.py) follow.

    prepare   rank 0: is this step already saved, by the checkpoint this run resumed from? if not, a fresh
              `.tmp-step-N/` (a killed save's leftover removed)
    write     every rank: its DCP shards and its RNG file, fsynced
    finish    every rank hashes a share of the files; rank 0 writes train_state.json, config.yaml, the dataset's
              tokenizer.json (when it has one: the data's), meta.json (sizes, digests), and COMPLETE, fsyncs them
              and the directory, and renames it to `step-N/`: the commit; then retention, then `latest` (at a
              checkpoint that exists)

Nothing that looks complete exists before the rename, and the rename happens only after every rank's files are on disk,
so neither a crash mid-save nor a power loss after it leaves a checkpoint that looks complete and is not. A complete
checkpoint already at `step-N/` that this run did not load (another run's, or a line this run abandoned) is replaced:
it is renamed aside before the commit and deleted after it. Any failure on any rank is raised on every rank as the same
one-line CheckpointError, and the temporary directory is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import smollm2
from smollm2.checkpoint.integrity import file_digest, written_files
from smollm2.checkpoint.layout import (
    COMPLETE,
    CheckpointStorage,
    checkpoint_step,
    is_final,
    read_meta,
    step_dir_name,
    warn,
)
from smollm2.checkpoint.rng import RNG_FORMAT, rng_file, rng_state
from smollm2.config import Config, to_dict, to_yaml
from smollm2.data.tokenizer import TOKENIZER_FILE, tokenizer_to_save
from smollm2.distributed import every_rank, rank0_decides
from smollm2.errors import CheckpointError, one_line
from smollm2.files import fsync_dir

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_BELOW_BYTES = 1 << 20  # a write that failed with less room than this left failed for want of room
_WRITER_FAILURE = "inline_container"  # torch's zip writer (torch.save): its I/O errors are RuntimeErrors


def root_cause(err: BaseException) -> BaseException:
    """DCP's CheckpointException (a BaseException, so `except Exception` misses it) wraps each rank's error: the first
    rank's; any other error: itself."""
    failures = getattr(err, "failures", None)
    if isinstance(err, CheckpointException) and failures:
        return next(iter(failures.values()))[0]
    return err


class SaveJob:
    """The save of `step` into `storage` (see the module docstring). `train_state` and `cfg` are captured when the save
    starts; `on_commit` runs on rank 0 once the checkpoint is committed (retention)."""

    def __init__(self, storage: CheckpointStorage, step: int, train_state: dict[str, Any], cfg: Config, final: bool,
                 rank: int, world_size: int, on_commit: Callable[[Path], None], loaded: Path | None = None):
        self.storage, self.step, self.train_state, self.cfg, self.final = storage, step, train_state, cfg, final
        self.rank, self.world_size, self.on_commit, self.loaded = rank, world_size, on_commit, loaded
        self.target = storage.root / step_dir_name(step)
        self.tmp = storage.root / f".tmp-{step_dir_name(step)}"
        self.previous: str | None = None  # the newest complete checkpoint: what a failed save leaves as the latest

    # ---------------------------------------------------------------------------------------------------- prepare

    def prepare(self) -> bool:
        """Collective: whether the step is already saved: by the checkpoint this run resumed from (a run resumed at the
        step it then ends at), and by nothing else. Decided by rank 0 alone: a rank that (through a stale listing) saw it
        as saved would skip the collectives the others run."""
        done, self.previous = rank0_decides(self._prepare)
        return done

    def _prepare(self) -> tuple[bool, str | None]:  # rank 0
        target, storage = self.target, self.storage
        ours = self.loaded is not None and target.resolve() == self.loaded.resolve()
        if ours and storage.is_complete(target):
            if self.final and not is_final(target):  # the same state, now also this run's final checkpoint: keep it
                try:
                    storage.write_json(target / "meta.json", {**read_meta(target), "final": True})  # no digest covers it
                    fsync_dir(target)
                except (OSError, CheckpointError) as err:
                    warn(f"could not mark {target} as the run's final checkpoint ({err}): keep_last may rotate it out")
            return True, None
        try:
            storage.recover()
        except OSError as err:
            warn(f"could not finish the replacement a killed save left in {storage.root}: {err.strerror or err}")
        previous = storage.latest()
        self.previous = None if previous is None else str(previous)
        try:
            if self.tmp.exists():  # a save that was killed
                shutil.rmtree(self.tmp)
            if target.exists() and not storage.is_complete(target):  # an incomplete copy at this step's name
                shutil.rmtree(target)
            (self.tmp / "rng").mkdir(parents=True)
        except OSError as err:
            raise self.error(err) from err
        return False, self.previous

    # ------------------------------------------------------------------------------------------------------ write

    def guard(self, work: Callable[[], Any]) -> Callable[[], Any]:
        """`work`, a write failure (DCP's wrapped in a CheckpointException) raised as the save's one-line error, DCP's
        other failures as their first rank's error. torch's file writer reports a full disk as a RuntimeError
        ("unexpected pos ..."), not an OSError: a failure while the filesystem has no room left is a full disk."""
        def run() -> Any:
            try:
                return work()
            except (Exception, CheckpointException) as err:
                cause = root_cause(err)
                if isinstance(cause, OSError):
                    raise self.error(cause) from err
                if self._disk_full():
                    raise self.error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from err
                if isinstance(cause, RuntimeError) and _WRITER_FAILURE in str(cause):
                    raise self.error(OSError(errno.EIO, one_line(cause))) from err
                if isinstance(err, CheckpointException):
                    raise cause from err
                raise
        return run

    def _disk_full(self) -> bool:
        try:
            return shutil.disk_usage(self.storage.root).free < _FULL_BELOW_BYTES
        except OSError:
            return False

    def write(self, state: dict[str, Any]) -> list[str]:  # every rank
        """Write this rank's shards of `state` (DCP) and its RNG states into the temporary directory; returns the data
        files every rank wrote. sync_files (DCP's default, pinned here) fsyncs every shard and .metadata."""
        written = dcp.save(state, storage_writer=dcp.FileSystemWriter(self.tmp, sync_files=True))
        self.write_rng()
        return written_files(written, self.world_size)

    def write_rng(self) -> None:
        self.storage.write_file(rng_file(self.tmp, self.rank), lambda f: torch.save(rng_state(), f))

    def remove_tmp(self) -> None:  # best effort: a leftover is removed by the next save at this step anyway
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ----------------------------------------------------------------------------------------------------- finish

    def finish(self, names: list[str], group=None) -> Path:
        """Collective over `group`: hash, then commit. `names`: the data files every rank wrote (the same everywhere)."""
        mine = names[self.rank :: self.world_size]
        shares = every_rank(self.guard(lambda: {name: file_digest(self.tmp / name) for name in mine}), self.remove_tmp,
                            group)
        files = dict(sorted(item for share in shares for item in share.items()))
        meta = {"step": self.step, "world_size": self.world_size, "final": self.final, "rng_format": RNG_FORMAT,
                "model": to_dict(self.cfg.model), "config": to_dict(self.cfg), "files": files,
                "versions": {"smollm2": smollm2.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        rank0_decides(self.guard(lambda: self._commit(meta)), group)
        return self.target

    def _commit(self, meta: dict[str, Any]) -> None:  # rank 0
        storage, tmp, target = self.storage, self.tmp, self.target
        replaced = None
        try:
            storage.write_json(tmp / "train_state.json", self.train_state)
            storage.write_file(tmp / "config.yaml", lambda f: f.write(to_yaml(self.cfg).encode()))
            self._write_tokenizer(meta)
            storage.write_json(tmp / "meta.json", meta)
            storage.write_file(tmp / COMPLETE, lambda f: f.write(f"{meta['step']}\n".encode()))
            fsync_dir(tmp / "rng")
            fsync_dir(tmp)  # every name in it is durable before the rename publishes them
            # A complete checkpoint this run did not load, at this step: set aside now, deleted once the new one is in
            if target.exists():
                replaced = storage.set_aside(target, f".replaced-{target.name}")
            os.rename(tmp, target)  # the commit
            fsync_dir(storage.root)  # the rename itself
        except BaseException:
            if not target.exists():
                self.remove_tmp()
                if replaced is not None:  # the new one is not in: the old one goes back
                    os.rename(replaced, target)
            raise
        # Committed: nothing below fails the save. Retention first (it never removes `target`), then `latest`, so the
        # link never names a deleted checkpoint (it is a convenience: --resume latest scans the directory).
        try:
            if replaced is not None:
                warn(f"replaced {target} (a checkpoint this run did not resume from) with this run's step {self.step}")
                storage.remove(replaced)
            self.on_commit(target)
        except OSError as err:  # what is left is removed by the next save's retention or recovery
            warn(f"step {self.step} is committed, but removing older checkpoints failed: {err.strerror or err}"
                 f"{f' ({err.filename})' if err.filename else ''}")
        storage.point_latest()

    def _write_tokenizer(self, meta: dict[str, Any]) -> None:  # rank 0
        """The checkpoint carries the tokenizer its data was made with (generate and export read it): the dataset's
        tokenizer.json, digested like the data files, and meta.json's "tokenizer" (name, vocab, EOS, pad, sha256).
        Nothing for GPT-2's bundled BPE: a checkpoint without one is GPT-2's, as every checkpoint saved before."""
        found = tokenizer_to_save(self.cfg.data.tokenizer_path())
        if found is None:
            return
        raw, meta["tokenizer"] = found
        self.storage.write_file(self.tmp / TOKENIZER_FILE, lambda f: f.write(raw))
        meta["files"] = dict(sorted({**meta["files"], TOKENIZER_FILE: file_digest(self.tmp / TOKENIZER_FILE)}.items()))

    def error(self, err: OSError) -> CheckpointError:
        """The save's one-line error for an OSError: what happened, and that the previous checkpoint is intact."""
        kept = (f"the previous checkpoint step {checkpoint_step(self.previous)} is intact ({self.previous})"
                if self.previous else "there is no earlier checkpoint")
        if err.errno in _DISK_FULL:
            return CheckpointError(f"disk full while saving step {self.step} to {self.target}; {kept}; free space (or "
                                   "lower checkpoint.keep_last / keep_every), then --resume latest")
        where = f" ({err.filename})" if err.filename else ""
        return CheckpointError(f"cannot save step {self.step} to {self.target}: {err.strerror or err}{where}; {kept}")

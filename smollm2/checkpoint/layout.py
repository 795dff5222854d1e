"""Where a run's checkpoints live, how they are named, and which of them count.

    <run_dir>/checkpoints/step-000500/    one checkpoint (see smollm2/checkpoint/__init__.py for its files)
    <run_dir>/checkpoints/.tmp-step-*/    a save in progress (or one that was killed): never loaded
    <run_dir>/checkpoints/latest          a symlink to the newest complete checkpoint (a convenience: the scan decides)
    <run_dir>/checkpoints/.replaced-step-*/   a checkpoint a save is replacing: removed once the new one is committed,
                                          renamed back by `recover` if that save was killed before its commit
    <run_dir>/checkpoints/.removing-*/    a checkpoint being deleted (retention): a deletion cut short leaves only this

A checkpoint is complete when it holds its COMPLETE marker, meta.json and DCP's .metadata. `CheckpointStorage` is the
directory as the checkpoint manager sees it: its listing and the files a commit writes. On a cluster one node's listing
can be stale (NFS caches directory attributes), so only rank 0's is ever used for a decision; tests give a rank a stale
listing by subclassing it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from smollm2.errors import CheckpointError
from smollm2.files import atomic_write_json, fsync_dir, write_synced

STEP_DIR = re.compile(r"^step-(\d{6,})$")
REPLACED = re.compile(r"^\.replaced-(step-\d{6,})(-\d+)?$")
COMPLETE = "COMPLETE"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint directory (`.../step-000500` -> 500; a `latest` symlink -> its target's step)."""
    path = Path(path)
    match = STEP_DIR.match(path.name) or STEP_DIR.match(path.resolve().name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a step-NNNNNN name)")
    return int(match.group(1))


class CheckpointStorage:
    """A run's checkpoint directory: what its listing holds, and the synced writes a commit makes in it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def is_complete(self, path: Path) -> bool:
        return (path / COMPLETE).is_file() and (path / "meta.json").is_file() and (path / ".metadata").is_file()

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first (numerically: step-1000000 after step-999999)."""
        found = []
        if self.root.is_dir():
            for child in self.root.iterdir():
                match = STEP_DIR.match(child.name)
                if match and child.is_dir() and not child.is_symlink() and self.is_complete(child):
                    found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def write_file(self, path: Path, write: Callable[[IO[bytes]], Any]) -> None:
        """Create `path` with `write(file)` and fsync it."""
        write_synced(path, write)

    def write_json(self, path: Path, data: Any) -> None:
        """Write `data` as JSON atomically (old or new, never partial), fsynced."""
        atomic_write_json(path, data)

    def set_aside(self, path: Path, name: str) -> Path:
        """Rename `path` to `name` in this directory (`name-2`, `-3`, ... if taken), durably; returns the new path. A name
        that does not match step-NNNNNN is never listed as a checkpoint again, and nothing is deleted."""
        new, n = self.root / name, 1
        while new.exists() or new.is_symlink():
            n += 1
            new = self.root / f"{name}-{n}"
        os.rename(path, new)
        fsync_dir(self.root)
        return new

    def remove(self, path: Path) -> None:
        """Delete a checkpoint: renamed to `.removing-<name>` first (atomic), so that a deletion cut short leaves no
        half-deleted step directory, only a folder that `recover` removes."""
        gone, n = path.parent / f".removing-{path.name}", 1
        while gone.exists():
            n += 1
            gone = path.parent / f".removing-{path.name}-{n}"
        os.rename(path, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def point_latest(self) -> Path | None:
        """Point `latest` at the newest complete checkpoint (remove it if there is none), atomically; returns it. A
        filesystem without symlinks gets a warning: the link is a convenience, `--resume latest` scans the directory."""
        newest, link, tmp_link = self.latest(), self.root / "latest", self.root / ".latest.tmp"
        try:
            if tmp_link.is_symlink() or tmp_link.exists():
                tmp_link.unlink()
            if newest is None:
                link.unlink(missing_ok=True)
            else:
                tmp_link.symlink_to(newest.name)
                os.replace(tmp_link, link)
            fsync_dir(self.root)
        except OSError as err:
            warn(f"could not point {link} at {newest.name if newest else 'nothing'} ({err.strerror or err}); --resume "
                 "latest scans the directory and is not affected")
        return newest

    def recover(self) -> None:
        """Finish a replacing save that was killed between its two renames (see SaveJob._commit): a `.replaced-step-N`
        whose step-N is not complete goes back to step-N (the new one never committed); one whose step-N is complete is
        removed (it did). What a deletion cut short left (`.removing-*`) is removed. Rank 0, before it decides anything
        from the listing."""
        if not self.root.is_dir():
            return
        for old in sorted(self.root.iterdir()):
            if old.name.startswith(".removing-") and old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
                continue
            if not (match := REPLACED.match(old.name)) or not old.is_dir():
                continue
            target = self.root / match.group(1)
            if self.is_complete(target):
                self.remove(old)
            elif self.is_complete(old):
                if target.exists():  # what remains of a step-N that was being removed
                    shutil.rmtree(target)
                os.rename(old, target)
                fsync_dir(self.root)
                warn(f"a save that was replacing {target} was cut short before its commit: {target.name} is restored")


def is_complete(path: Path) -> bool:
    return CheckpointStorage(path.parent).is_complete(path)


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ckpt_root, oldest first."""
    return CheckpointStorage(ckpt_root).complete()


def find_latest(ckpt_root: Path) -> Path | None:
    return CheckpointStorage(ckpt_root).latest()


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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, or bytes that are not UTF-8
        raise CheckpointError(f"{path} is unreadable: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is unreadable: a JSON {type(data).__name__}, not an object")
    return data


def read_meta(path: Path) -> dict[str, Any]:
    return _read_json(path / "meta.json")


def read_train_state(path: Path) -> dict[str, Any]:
    return _read_json(path / "train_state.json")


def is_final(path: Path) -> bool:
    """Whether meta.json marks the checkpoint as a run's final one (train.max_steps reached): never pruned."""
    try:
        return json.loads((path / "meta.json").read_text()).get("final") is True
    except (OSError, ValueError, AttributeError):
        return False

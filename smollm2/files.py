"""File helpers shared by the whole project: durable writes, the one atomic JSON writer, the one file hash, the one JSONL
reader.

`atomic_write_json` writes `<name>.tmp` next to the target, fsyncs it and renames it over the target, so a reader (or
a crash) sees the old file or the new one, never a partial one. `write_synced` and `fsync_dir` make a new file and then
its name durable (what a checkpoint's commit needs before its rename). `sha256_file` hashes a file in 1 MiB blocks, so a
shard of any size is never read whole into memory. Nothing here imports the rest of smollm2.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

_HASH_BLOCK = 1 << 20


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write `data` as JSON (indent 2, sorted keys) to `path` atomically; on any error the old file is left as it was.

    The temp file is `<path>.tmp` in the same directory (os.replace is atomic only within one file system), so one
    writer per path at a time."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_folder(out: Path, write: Callable[[Path], Any]) -> None:
    """Make the folder `out` with `write(tmp)` into `.tmp-<name>` beside it, then rename it into place: a failure leaves
    nothing, and an `out` that exists (the caller has allowed replacing it) is moved aside, not deleted, until the new
    one is in."""
    tmp, old = out.parent / f".tmp-{out.name}", out.parent / f".old-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run of the command that was killed
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        if out.exists() or out.is_symlink():
            _remove(old)
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_synced(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Create `path` with `write(file)`, then fsync it: on disk before the directory that holds it is committed."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the directory's entries durable (files created or renamed in it): fsyncing a file does not cover its name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems that cannot fsync a directory say so
            raise
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The step records of a JSONL file the trainer appends to (metrics, eval, events): the rows that are objects with an
    integer `step`. A torn last line (a killed run) is skipped; a missing file is no rows."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows

"""File helpers shared by the whole project: the one atomic JSON writer, the one file hash, the one JSONL reader.

`atomic_write_json` writes `<name>.tmp` next to the target, fsyncs it and renames it over the target, so a reader (or
a crash) sees the old file or the new one, never a partial one. `sha256_file` hashes a file in 1 MiB blocks, so a shard
of any size is never read whole into memory. Nothing here imports the rest of smollm2.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

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


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["atomic_write_json", "sha256_file"]


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

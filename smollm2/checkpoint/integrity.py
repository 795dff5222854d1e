"""Integrity: the size and sha256 of every data file a save wrote, recorded in meta.json and checked before a load; and
that the files are of a trusted format (smollm2/checkpoint/trust.py).

DCP keeps no checksums: a shard damaged in place (a bad disk, an interrupted copy) loads without an error, its bytes
silently becoming weights. Hashing costs a fraction of writing the same bytes (docs/checkpoints.md has the measurement),
so no faster checksum is worth a second format. On several ranks each hashes a share of the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smollm2.errors import CheckpointError
from smollm2.files import sha256_file


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def written_files(metadata: Any, world_size: int) -> list[str]:
    """The data files a save wrote, from what DCP's save returned (the same on every rank), not from a listing of the
    directory, which on a network filesystem may not show another node's files yet: .metadata, the shards, the RNG."""
    shards = {info.relative_path for info in (getattr(metadata, "storage_data", None) or {}).values()
              if getattr(info, "relative_path", None)}
    return sorted({".metadata", *shards, *(f"rng/rank-{rank:05d}.pt" for rank in range(world_size))})


def file_problems(path: Path, recorded: dict[str, dict[str, Any]], names: list[str], rng_format: int = 2) -> list[str]:
    """What differs between the files `names` of the checkpoint at `path` and the digests meta.json recorded, and which
    of them are not of a trusted format (local: this process reads them)."""
    problems = _digest_problems(path, recorded, names)
    if problems:
        return problems
    return _trust_problems(path, names, rng_format)


def _trust_problems(path: Path, names: list[str], rng_format: int) -> list[str]:
    """The pickled parts, read the way a load reads them (imported here: the CLI's other commands need no torch)."""
    from smollm2.checkpoint.rng import read_rng_file
    from smollm2.checkpoint.trust import byte_item_problems, read_metadata

    problems = []
    for name in names:
        try:
            if name == ".metadata":
                read_metadata(path)
            elif name.startswith("rng/") and rng_format >= 2:
                read_rng_file(path / name)
        except CheckpointError as err:  # one line naming the file, relative to the checkpoint like the others
            problems.append(str(err).replace(f"{path / name}", name).removeprefix(f"{path}: "))
    return problems + byte_item_problems(path, names)


def _digest_problems(path: Path, recorded: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
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


def problems(path: Path, meta: dict[str, Any]) -> list[str]:
    """Every difference between a checkpoint's files and its meta.json (local: this process reads them all)."""
    recorded = meta.get("files") or {}
    return file_problems(path, recorded, sorted(recorded), meta.get("rng_format", 1))


def damaged(path: Path, found: list[str]) -> CheckpointError:
    return CheckpointError(f"{path} is damaged: {'; '.join(found)}; resume from another checkpoint "
                           "(python -m smollm2.checkpoint list RUN_DIR)")


def verify_files(path: Path, meta: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
    """Check the data files against the digests meta.json recorded at save time, each rank hashing a share; every rank
    raises the same CheckpointError if any differs. Collective when world_size > 1. Checkpoints saved before digests were
    recorded pass unchecked."""
    recorded = meta.get("files")
    if not recorded:
        return
    share = sorted(recorded)[rank::world_size]
    rng_format = meta.get("rng_format", 1)
    if world_size == 1:  # one process (the checkpoint CLI, generate): no process group
        found = file_problems(path, recorded, share, rng_format)
    else:
        from smollm2.distributed import barrier, every_rank

        found = [problem for part in every_rank(lambda: file_problems(path, recorded, share, rng_format))
                 for problem in part]
        if found:  # every rank has what the others found before any of them raises (and ends the group)
            barrier()
    if found:
        raise damaged(path, found)

"""The dataset manifest: `manifest.json` in a prepared dataset directory, and the marker of an unfinished prep.

A prepared directory holds `train_*.bin` / `val_*.bin` shards (smollm2/data/shards.py) and this manifest. data_prep writes the
manifest last, atomically, listing only complete shards; while it is (re)writing a directory it keeps INCOMPLETE_MARKER
there, so a directory holding the marker and no manifest is an interrupted prep, not a dataset.

Schema, format_version 1 (MANIFEST_VERSION). `read_manifest` checks the keys readers rely on:

    format_version  int     == MANIFEST_VERSION (checked first: another version may have another schema)
    tokenizer       object  with "vocab_size": int (also "name": str, "eos_id": int). GPT-2's BPE: "ranks_sha256": str.
                            A Hugging Face tokenizer (data_prep --tokenizer): "sha256": str of its tokenizer.json, which
                            the directory holds a copy of, with "eos_id": int and "pad_id": int
    shards          list    of {"file": str, relative to the directory; "split": "train" | "val"; "tokens": int >= 0;
                            "sha256": str, hex of the whole file}. Train shards first; within a split, stream order.

and data_prep also writes, for people and for its own up-to-date check (optional to readers):

    fingerprint         str     sha256 of everything that determines the shards (inputs, options, tokenizer, format)
    source, split       object  what was read and how documents were assigned to train / val (with the seed)
    shard_tokens        int     tokens per shard (the last of a split is shorter)
    documents, tokens   object  counts per split
    document_separator, replaced_bytes, created, seconds

Readers get the parsed JSON as a plain dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smollm2.errors import DataError
from smollm2.files import atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
INCOMPLETE_MARKER = ".prep-incomplete"
SPLITS = ("train", "val")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _schema_problem(manifest: Any) -> str | None:
    """What is wrong with a parsed manifest against the schema above, or None."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if "format_version" not in manifest:
        return "no 'format_version'"
    version = manifest["format_version"]
    if version != MANIFEST_VERSION or not _is_int(version):
        return f"format version {version!r}, this code reads version {MANIFEST_VERSION}"
    tokenizer = manifest.get("tokenizer")
    if not isinstance(tokenizer, dict) or not _is_int(tokenizer.get("vocab_size")):
        return "no 'tokenizer' object with an int 'vocab_size'"
    if "sha256" in tokenizer and not (isinstance(tokenizer["sha256"], str) and _is_int(tokenizer.get("eos_id"))
                                      and _is_int(tokenizer.get("pad_id"))):
        return "a 'tokenizer' with a 'sha256' needs a str 'sha256' and int 'eos_id' and 'pad_id'"
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "no 'shards' list"
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            return f"shards[{i}] is not an object"
        for key, ok in [("file", lambda v: isinstance(v, str) and v), ("split", lambda v: v in SPLITS),
                        ("tokens", lambda v: _is_int(v) and v >= 0), ("sha256", lambda v: isinstance(v, str))]:
            if key not in shard:
                return f"shards[{i}] has no '{key}'"
            if not ok(shard[key]):
                return f"shards[{i}] has a bad '{key}': {shard[key]!r}"
    return None


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The directory's manifest, checked against the schema; None if it has none. DataError if it is unreadable,
    malformed or of another format version."""
    path = Path(directory) / MANIFEST_NAME
    fix = f"rerun `python -m data_prep --source <your source> --out {Path(directory)}` to re-prepare it"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DataError(f"cannot read the dataset manifest {path} ({err.strerror or err}); {fix}") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise DataError(f"{path} is not a valid dataset manifest (not JSON: {err}); {fix}") from None
    if (problem := _schema_problem(manifest)) is not None:
        raise DataError(f"{path} is not a valid dataset manifest ({problem}); {fix}")
    return manifest


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write the directory's manifest atomically (old or new, never partial); return its path. A manifest that breaks
    the schema is a bug in the caller (ValueError), so data_prep can never write one that readers reject."""
    if (problem := _schema_problem(manifest)) is not None:
        raise ValueError(f"refusing to write a manifest that breaks the schema: {problem}")
    path = Path(directory) / MANIFEST_NAME
    atomic_write_json(path, manifest)
    return path


__all__ = ["INCOMPLETE_MARKER", "MANIFEST_NAME", "MANIFEST_VERSION", "read_manifest", "write_manifest"]

"""A prepared dataset directory read as token streams: the train and val shards, memory-mapped, every id checked on open.

The train shards are read as one concatenated token stream (TokenStream); smollm2/data/loader.py cuts it into windows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from smollm2.data.manifest import INCOMPLETE_MARKER, MANIFEST_NAME, read_manifest
from smollm2.data.shards import open_shard, read_header, validate_shard
from smollm2.errors import DataError

PREP_HINT = "run `make prep` (python -m data_prep --source shakespeare), or set data.path to a prepared directory"


class TokenStream:
    """Shards (memory-mapped) read as one concatenated sequence of tokens; with vocab_size, every id is checked on open."""

    def __init__(self, paths: list[Path], vocab_size: int | None = None):
        self.paths = paths
        self.shards = [open_shard(p, vocab_size) for p in paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # starts[i]: offset of shard i; [-1]: total

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, copied out of the shards (a read may span a shard boundary)."""
        assert 0 <= start and start + length <= len(self), (start, length, len(self))
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            offset = start + filled - int(self.starts[shard])
            take = min(length - filled, len(self.shards[shard]) - offset)
            out[filled : filled + take] = self.shards[shard][offset : offset + take]
            filled += take
            shard += 1
        return out


class Dataset:
    """A prepared dataset directory: train_*.bin, val_*.bin and manifest.json (from data_prep), or an llm.c /
    modded-nanogpt directory of *train*.bin / *val*.bin without a manifest.

    Opening either kind scans every token id of every shard against the model's vocab (memory-mapped, in blocks):
    an id >= the vocab is one DataError naming the file, the id and its position, not an IndexError (or, on a GPU, a
    device-side assert that names no file) in the embedding hours later. No manifest vouches for an llm.c directory's
    ids; a manifest does (data_prep refuses such ids when it writes), but not for a shard damaged or replaced since, and
    the scan costs what reading the data once does (docs/data.md, "Checks on open"; the ranks of a node share the page
    cache). Not cached: a cache keyed by size + mtime would save seconds per start but trust a file rewritten in place."""

    def __init__(self, path: Path, train: TokenStream, val: TokenStream, manifest: dict | None, fingerprint: str):
        self.path, self.train, self.val, self.manifest, self.fingerprint = path, train, val, manifest, fingerprint

    @property
    def train_tokens(self) -> int:
        return len(self.train)

    @property
    def val_tokens(self) -> int:
        return len(self.val)

    @classmethod
    def open(cls, path: str | Path, vocab_size: int = 50258) -> Dataset:
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"no prepared dataset at {path}: {PREP_HINT}")
        manifest = read_manifest(path)  # None if absent; DataError if malformed or of another version
        if manifest is not None:
            return cls._open_manifest(path, manifest, vocab_size)
        if (path / INCOMPLETE_MARKER).exists():
            raise DataError(f"the data prep into {path} did not finish (interrupted?): re-run it; {PREP_HINT}")
        train_paths, val_paths = sorted(path.glob("*train*.bin")), sorted(path.glob("*val*.bin"))
        if not train_paths:
            raise DataError(f"{path} holds no {MANIFEST_NAME} and no *train*.bin shards: {PREP_HINT}")
        train, val = TokenStream(train_paths, vocab_size), TokenStream(val_paths, vocab_size)  # every id scanned
        listing = [(p.name, len(tokens)) for p, tokens in zip(train.paths, train.shards)]
        fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        return cls(path, train, val, None, fingerprint)

    @classmethod
    def _open_manifest(cls, path: Path, manifest: dict[str, Any], vocab_size: int) -> Dataset:
        """A directory with a (schema-checked) manifest: every listed shard must be there with its token count."""
        manifest_path = path / MANIFEST_NAME
        data_vocab, shards = manifest["tokenizer"]["vocab_size"], manifest["shards"]
        if data_vocab > vocab_size:
            raise DataError(f"{path} was tokenized with a {data_vocab}-token vocab, the model has {vocab_size} "
                            f"(model.vocab_size): set model.vocab_size={data_vocab} or more for this data, or re-prepare "
                            f"it with a tokenizer that fits (python -m data_prep --tokenizer PATH --out {path} ...)")
        split_paths: dict[str, list[Path]] = {"train": [], "val": []}
        for shard in shards:
            shard_path = path / shard["file"]
            if not shard_path.is_file():
                raise DataError(f"{shard_path} is listed in {manifest_path} but missing: {PREP_HINT}")
            if (count := read_header(shard_path)) != shard["tokens"]:
                raise DataError(
                    f"{shard_path} holds {count:,} tokens, the manifest says {shard['tokens']:,}: {PREP_HINT}"
                )
            split_paths[shard["split"]].append(shard_path)
        if not split_paths["train"]:
            raise DataError(f"{manifest_path} lists no train shards: {PREP_HINT}")
        train_listing = [(s["file"], s["tokens"], s["sha256"]) for s in shards if s["split"] == "train"]
        fingerprint = hashlib.sha256(json.dumps(train_listing).encode()).hexdigest()
        # The vocab check above trusts the manifest; the scan checks the files themselves (see the class docstring).
        train, val = TokenStream(split_paths["train"], vocab_size), TokenStream(split_paths["val"], vocab_size)
        return cls(path, train, val, manifest, fingerprint)

    def verify(self, vocab_size: int = 50258) -> None:
        """The slow, full check: every token id, and every sha256 the manifest lists."""
        listed = {s["file"]: s for s in (self.manifest or {}).get("shards", [])}
        for shard_path in self.train.paths + self.val.paths:
            entry = listed.get(shard_path.name)
            validate_shard(shard_path, vocab_size, entry and entry["sha256"], entry and entry["tokens"])

    def __repr__(self) -> str:
        return f"Dataset({self.path}, train_tokens={self.train_tokens:,}, val_tokens={self.val_tokens:,})"



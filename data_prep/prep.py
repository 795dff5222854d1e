"""Source -> tokens (GPT-2's, or any Hugging Face tokenizer.json) -> train/val shards + manifest.json, streaming, on all
cores.

    python -m data_prep --source shakespeare                      # -> data/shakespeare/
    python -m data_prep --source 'corpus/*.jsonl.gz' --val-tokens 1000000 --out data/corpus
    python -m data_prep --source shakespeare --tokenizer tokenizer.json --out data/shakespeare-2k

Each document is followed by EOS (50256 for GPT-2; the tokenizer's EOS otherwise), so a shard split at EOS gives back
the documents. Documents go to train or val whole. With `--tokenizer`, the directory also holds a copy of the
`tokenizer.json` (the dataset is self-contained: training, its checkpoints and exports take the tokenizer from it), the
manifest records its name, vocab, EOS, pad and sha256, and shards are uint32 when the vocab exceeds 65,536 (shards.py).

Tokenizing runs on `workers` threads (tiktoken releases the GIL; measured as fast as a multiprocessing pool, with
no pickling) over chunks of documents while this thread reads the next chunk and writes finished ones in order; at most
`workers + 2` chunks of ~64K characters are in flight, so memory is bounded however large the corpus (one document is
held whole, except a huge .txt/.md, which is read in pieces: see sources.py).

A directory being prepared holds a `.prep-incomplete` marker from the first shard write until the manifest is in place;
the manifest is written last (tmp + rename) and lists only complete shards, so an interrupted run never leaves a
manifest that names a partial shard. Re-running with the same inputs and options is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep.sources import Piece, Source, resolve_source
from smollm2.data.manifest import INCOMPLETE_MARKER, MANIFEST_NAME, MANIFEST_VERSION, read_manifest, write_manifest
from smollm2.data.shards import MAX_TOKENS, ShardWriter, read_header
from smollm2.data.tokenizer import EOS_ID, RANKS_SHA256, TOKENIZER_FILE, VOCAB_SIZE, HFTokenizer, get_tokenizer
from smollm2.errors import DataError
from smollm2.files import write_synced

DEFAULT_VAL_FRACTION = 0.05
CHUNK_CHARS = 1 << 16  # text per tokenizer job: small, so the last jobs of a run do not leave cores idle
CHUNK_PIECES = 1024


@dataclass
class PrepOptions:
    source: str = "shakespeare"
    out: str | None = None  # default data/<source name>
    val_fraction: float | None = None  # default DEFAULT_VAL_FRACTION unless val_tokens is given
    val_tokens: int | None = None
    seed: int = 1234
    shard_tokens: int = 100_000_000
    text_field: str = "text"
    tokenizer: str | None = None  # a Hugging Face tokenizer.json (or a folder holding one); None: GPT-2's BPE
    workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else (os.cpu_count() or 1))
    force: bool = False
    progress: bool = True


@dataclass
class PrepResult:
    out: Path
    manifest: dict[str, Any]
    skipped: bool  # True when the dataset was already up to date
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------- split


class ValSplit:
    """Which documents go to val: decided per document, in stream order, deterministic from the seed.

    fraction f: systematic sampling with a seeded phase u in [0, 1): document i is val iff floor((i+1)f + u) >
    floor(i f + u). Exactly round(n f) of n documents (never zero once n f >= 1), evenly spread, streaming.
    tokens N: the first documents of the stream go to val until it holds at least N tokens.
    """

    def __init__(self, seed: int, fraction: float | None, tokens: int | None):
        self.fraction, self.tokens = fraction, tokens
        self.phase = int.from_bytes(hashlib.sha256(f"val-split/{seed}".encode()).digest()[:8], "little") / 2**64

    def is_val(self, doc_index: int, val_tokens_so_far: int) -> bool:
        if self.tokens is not None:
            return val_tokens_so_far < self.tokens
        f, u = self.fraction or 0.0, self.phase
        return int((doc_index + 1) * f + u) > int(doc_index * f + u)

    def describe(self) -> dict[str, Any]:
        if self.tokens is not None:
            return {"rule": "first documents of the stream until val holds >= val_tokens tokens",
                    "val_tokens": self.tokens}
        return {"rule": "document i is val iff floor((i+1)*f + u) > floor(i*f + u), u = phase from the seed",
                "val_fraction": self.fraction, "phase": self.phase}


# ---------------------------------------------------------------------------------------------------- writing


class SplitWriter:
    """Tokens of one split -> `<split>_000000.bin`, `<split>_000001.bin`, ... of `shard_tokens` each (the last shorter).

    Documents may continue across a shard boundary: the loader reads the shards as one concatenated stream."""

    def __init__(self, out: Path, split: str, shard_tokens: int, vocab_size: int = VOCAB_SIZE):
        self.out, self.split, self.shard_tokens, self.vocab_size = out, split, shard_tokens, vocab_size
        self.shards: list[dict[str, Any]] = []
        self.written: list[Path] = []  # shard files this run has completed (removed again if it fails)
        self.writer: ShardWriter | None = None
        self.tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self.writer is None:  # opened lazily, so an empty split writes no file
                self.writer = ShardWriter(self.out / f"{self.split}_{len(self.shards):06d}.bin", self.vocab_size)
            room = self.shard_tokens - self.writer.num_tokens
            self.writer.write(tokens[:room])
            self.tokens += min(room, tokens.size)
            tokens = tokens[room:]
            if self.writer.num_tokens == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        assert self.writer is not None
        path = self.writer.path
        num_tokens, sha256 = self.writer.close()
        self.writer = None
        self.written.append(path)
        self.shards.append({"file": path.name, "split": self.split, "tokens": num_tokens, "sha256": sha256})

    def close(self) -> None:
        if self.writer is not None:
            self._close_shard()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        for path in self.written:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- tokenizing


def _encode_chunk(chunk: list[Piece], tokenizer=None) -> list[tuple[np.ndarray, bool]]:
    tokenizer = tokenizer or get_tokenizer()
    out = []
    for text, ends_document in chunk:
        out.append((tokenizer.encode_numpy(text, eos=ends_document), ends_document))
    return out


def _chunks(pieces: Iterator[Piece]) -> Iterator[list[Piece]]:
    chunk: list[Piece] = []
    chars = 0
    for piece in pieces:
        chunk.append(piece)
        chars += len(piece[0])
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_PIECES:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def tokenize(pieces: Iterator[Piece], workers: int, tokenizer=None) -> Iterator[tuple[np.ndarray, bool]]:
    """(tokens, ends_document) per piece, in source order, EOS appended at each document's end (GPT-2's tokenizer
    unless one is given)."""
    in_flight: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize") as pool:
        try:
            for chunk in _chunks(pieces):
                in_flight.append(pool.submit(_encode_chunk, chunk, tokenizer))
                while len(in_flight) > workers + 1:
                    yield from in_flight.popleft().result()
            while in_flight:
                yield from in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()


# ---------------------------------------------------------------------------------------------------- prep


def fingerprint_of(source: Source, opts: PrepOptions, split: ValSplit, tokenizer=None) -> str:
    """Everything that determines the shards: inputs (paths, sizes, mtimes or hashes), options, tokenizer (its file's
    sha256 for a Hugging Face one: prepping again with another tokenizer is never a no-op), format."""
    hf = tokenizer is not None and tokenizer.sha256 is not None
    blob = {
        "format_version": MANIFEST_VERSION,
        "tokenizer": ({"name": tokenizer.name, "sha256": tokenizer.sha256, "eos_id": tokenizer.eos_id} if hf else
                      {"name": get_tokenizer().name, "ranks_sha256": RANKS_SHA256, "eos_id": EOS_ID}),
        "inputs": source.fingerprint(),
        "split": split.describe(),
        "shard_tokens": opts.shard_tokens,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def is_up_to_date(out: Path, fingerprint: str) -> bool:
    """The manifest was made from the same inputs and options, and its shards are all there with their token counts.

    A malformed manifest, or one of another format version, is simply out of date: the re-run replaces it."""
    try:
        manifest = read_manifest(out)
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            return False
        return all(read_header(out / shard["file"]) == shard["tokens"] for shard in manifest["shards"])
    except DataError:
        return False


def clear_previous(out: Path) -> None:
    """Before a (re-)prep: mark the directory incomplete, drop the stale manifest, then the old shards and tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    (out / INCOMPLETE_MARKER).write_text("a data_prep run started here and has not finished\n")
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for pattern in ("train_*.bin", "val_*.bin", "train_*.bin.tmp", "val_*.bin.tmp", MANIFEST_NAME + ".tmp",
                    TOKENIZER_FILE, TOKENIZER_FILE + ".tmp"):
        for path in out.glob(pattern):
            path.unlink()


def check_options(opts: PrepOptions) -> None:
    if opts.val_fraction is not None and opts.val_tokens is not None:
        raise DataError("give --val-fraction or --val-tokens, not both")
    if opts.val_fraction is not None and not 0 <= opts.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.val_tokens is not None and opts.val_tokens < 0:
        raise DataError(f"--val-tokens must be >= 0, got {opts.val_tokens}")
    if not 0 < opts.shard_tokens <= MAX_TOKENS:
        raise DataError(f"--shard-tokens must be in [1, {MAX_TOKENS:,}] (an int32 count), got {opts.shard_tokens}")
    if opts.workers < 1:
        raise DataError(f"--workers must be >= 1, got {opts.workers}")


def check_counts(source: str, docs: dict[str, int], empty_docs: int, train_tokens: int) -> None:
    """What was read can make a dataset: a document, and some train tokens."""
    if docs["train"] + docs["val"] == 0:
        raise DataError(f"source {source} holds no documents (all {empty_docs} are empty): nothing to prepare")
    if train_tokens == 0:
        raise DataError(f"all {docs['val']} documents of {source} went to val; lower --val-fraction / --val-tokens")


def prepare(opts: PrepOptions) -> PrepResult:
    """Prepare the dataset (or find it up to date); return where it is and its manifest."""
    check_options(opts)
    # A bad tokenizer (unreadable, no EOS) or source fails here, before anything is written.
    tokenizer = get_tokenizer() if opts.tokenizer is None else HFTokenizer(opts.tokenizer)
    source = resolve_source(opts.source, opts.text_field)
    out = Path(opts.out) if opts.out else Path("data") / source.name
    val_fraction = DEFAULT_VAL_FRACTION if opts.val_fraction is None and opts.val_tokens is None else opts.val_fraction
    split = ValSplit(opts.seed, val_fraction, opts.val_tokens)
    fingerprint = fingerprint_of(source, opts, split, tokenizer)
    if not opts.force and is_up_to_date(out, fingerprint):
        return PrepResult(out, read_manifest(out) or {}, skipped=True)

    start = time.perf_counter()
    clear_previous(out)
    writers = {name: SplitWriter(out, name, opts.shard_tokens, tokenizer.vocab_size) for name in ("train", "val")}
    docs = {"train": 0, "val": 0}
    empty_docs = 0
    try:
        doc_index, doc_split, doc_tokens = 0, None, 0
        bar = tqdm(desc=f"tokenizing {opts.source}", unit="tok", unit_scale=True, file=sys.stderr,
                   disable=None if opts.progress else True)  # None: off when stderr is not a terminal
        with bar:
            for tokens, ends_document in tokenize(source.pieces(), opts.workers, tokenizer):
                if doc_split is None:
                    doc_split = "val" if split.is_val(doc_index, writers["val"].tokens) else "train"
                doc_tokens += tokens.size
                if ends_document and doc_tokens == 1:  # an empty document: only its EOS; skip it
                    empty_docs += 1
                else:
                    writers[doc_split].write(tokens)
                    bar.update(tokens.size)
                    if ends_document:
                        docs[doc_split] += 1
                        doc_index += 1
                        bar.set_postfix(docs=f"{doc_index:,}", refresh=False)
                if ends_document:
                    doc_split, doc_tokens = None, 0
        for writer in writers.values():
            writer.close()
        check_counts(opts.source, docs, empty_docs, writers["train"].tokens)
        if tokenizer.sha256 is not None:  # a Hugging Face tokenizer: the dataset holds its copy
            write_synced(out / TOKENIZER_FILE, lambda f: f.write(tokenizer.raw))
        seconds = time.perf_counter() - start
        manifest = {
            "format_version": MANIFEST_VERSION,
            "tokenizer": tokenizer.describe(),
            "document_separator": "each document is followed by EOS",
            "source": source.describe(),
            "split": {**split.describe(), "seed": opts.seed, "unit": "whole documents"},
            "shard_tokens": opts.shard_tokens,
            "documents": {**docs, "empty_skipped": empty_docs},
            "tokens": {"train": writers["train"].tokens, "val": writers["val"].tokens},
            "replaced_bytes": source.replaced_bytes,
            "shards": writers["train"].shards + writers["val"].shards,
            "fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 3),
        }
        write_manifest(out, manifest)  # last, atomically: from here on the dataset is complete
    except BaseException:
        for writer in writers.values():
            writer.abort()
        (out / TOKENIZER_FILE).unlink(missing_ok=True)
        (out / INCOMPLETE_MARKER).unlink(missing_ok=True)  # nothing of this run is left to mark
        raise
    (out / INCOMPLETE_MARKER).unlink(missing_ok=True)
    return PrepResult(out, manifest, skipped=False, seconds=seconds)


def summary(result: PrepResult) -> str:
    m = result.manifest
    if result.skipped:
        return (f"{result.out} is up to date (same inputs and options as its {MANIFEST_NAME}): nothing to do "
                "(--force rebuilds)")
    tokens, docs = m["tokens"], m["documents"]
    shards = {s: sum(1 for shard in m["shards"] if shard["split"] == s) for s in ("train", "val")}
    total = tokens["train"] + tokens["val"]
    lines = [
        f"prepared {result.out}: {docs['train'] + docs['val']:,} documents ({docs['train']:,} train, {docs['val']:,} "
        f"val, {docs['empty_skipped']:,} empty skipped)",
        f"  train {tokens['train']:,} tokens in {shards['train']} shard(s), val {tokens['val']:,} tokens in "
        f"{shards['val']} shard(s)",
        f"  {m['replaced_bytes']:,} undecodable bytes replaced; {result.seconds:.1f} s, "
        f"{total / max(result.seconds, 1e-9):,.0f} tok/s",
    ]
    if (tok := m["tokenizer"]).get("sha256"):
        lines.append(f"  tokenizer {tok['name']} ({tok['vocab_size']:,} ids, EOS {tok['eos_id']}, pad {tok['pad_id']}; "
                     f"{'uint16' if tok['vocab_size'] <= 65536 else 'uint32'} shards), copied to {TOKENIZER_FILE}")
    if tokens["val"] == 0:
        lines.append("  warning: the val split is empty (too few documents for the fraction); eval will have no data")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> PrepOptions:
    defaults = PrepOptions()
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="shakespeare",
                   help="shakespeare (default) | .txt/.md/.jsonl/.parquet[.gz] file, dir or glob | hf:<name>[:cfg]")
    p.add_argument("--out", default=None, help="output directory (default data/<name>)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=None,
                     help=f"fraction of documents for val (default {DEFAULT_VAL_FRACTION})")
    val.add_argument("--val-tokens", type=int, default=None, help="val gets whole documents until it holds N tokens")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the val split")
    p.add_argument("--shard-tokens", type=int, default=defaults.shard_tokens, help="tokens per shard")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column / HF field holding the text")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="a Hugging Face tokenizer.json (or a folder holding one) instead of GPT-2's BPE; the directory "
                        "gets a copy (python -m data_prep.tokenizer trains one)")
    p.add_argument("--workers", type=int, default=defaults.workers, help="tokenizer threads (default: all cores)")
    p.add_argument("--force", action="store_true", help="rebuild even if the dataset is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    return PrepOptions(source=args.source, out=args.out, val_fraction=args.val_fraction, val_tokens=args.val_tokens,
                       seed=args.seed, shard_tokens=args.shard_tokens, text_field=args.text_field,
                       tokenizer=args.tokenizer, workers=args.workers, force=args.force, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    result = prepare(parse_args(argv))
    print(summary(result), flush=True)
    return 0


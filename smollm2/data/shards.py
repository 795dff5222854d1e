"""The `.bin` token shard, byte-compatible with llm.c / modded-nanogpt.

    header : 256 little-endian int32 = 1024 bytes; [0] magic, [1] version, [2] token count, the rest 0
    payload: `count` little-endian token ids, uint16 (magic 20240520, version 1) or uint32 (magic 20240801, version 7)
    size   : exactly 1024 + itemsize * count bytes

A vocab of up to 65,536 ids is written as uint16, GPT-2's and llm.c's format, which llm.c's C reader and modded-nanogpt
read. A larger vocab is written as uint32 under the header llm.c's own Python writer gives uint32 tokens
(dev/data/data_common.py, its "llama-3" files: magic 20240801, version 7), not a header of our own; llm.c's C reader
(and modded-nanogpt's) reads only uint16 and refuses these by their magic.

Reading memory-maps the payload (a shard is never loaded whole into RAM). Every violation raises DataError naming the
file and what is wrong. `ShardWriter` streams tokens into `<name>.tmp` and renames it on close, so a shard either exists
complete or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from smollm2.errors import DataError
from smollm2.files import sha256_file

MAGIC = 20240520
VERSION = 1
MAGIC_U32 = 20240801  # llm.c's header for uint32 tokens
VERSION_U32 = 7
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
TOKEN_DTYPE_U32 = np.dtype("<u4")
U16_VOCAB = 1 << 16  # a vocab of at most this many ids fits uint16
_FORMATS = {(MAGIC, VERSION): TOKEN_DTYPE, (MAGIC_U32, VERSION_U32): TOKEN_DTYPE_U32}
MAX_TOKENS = 2**31 - 1  # the count is an int32
# Tokens scanned per step by a checked open (32 MB): a block's max() allocates nothing, a whole-file comparison would
# allocate a byte per token (10 GB for FineWeb 10B); and the pages of a block already scanned can be reclaimed.
_CHECK_BLOCK = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    """What a shard of this vocab stores its ids as: uint16 while they fit, else uint32."""
    return TOKEN_DTYPE if vocab_size <= U16_VOCAB else TOKEN_DTYPE_U32


def make_header(num_tokens: int, dtype: np.dtype = TOKEN_DTYPE) -> bytes:
    if not 0 <= num_tokens <= MAX_TOKENS:
        raise DataError(f"a shard holds at most {MAX_TOKENS:,} tokens (int32 count), got {num_tokens:,}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (*((MAGIC, VERSION) if dtype == TOKEN_DTYPE else (MAGIC_U32, VERSION_U32)), num_tokens)
    return header.tobytes()


def read_header(path: str | Path) -> int:
    """Check a shard's header and size; return its token count."""
    return read_format(path)[0]


def read_format(path: str | Path) -> tuple[int, np.dtype]:
    """Check a shard's header and size; return its token count and the dtype of its ids."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"shard {path}: file not found") from None
    except OSError as err:
        raise DataError(f"shard {path}: cannot read ({err.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"shard {path}: truncated header ({len(raw)} bytes, a shard starts with {HEADER_BYTES})")
    magic, version, count = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=3))
    if magic not in (MAGIC, MAGIC_U32):
        raise DataError(f"shard {path}: bad magic {magic} (expected {MAGIC}): not an llm.c token shard (nor "
                        f"{MAGIC_U32}, llm.c's uint32 one)")
    if (dtype := _FORMATS.get((magic, version))) is None:
        expected_version = f"{VERSION}, uint16 tokens" if magic == MAGIC else f"{VERSION_U32}, uint32 tokens"
        raise DataError(f"shard {path}: unsupported version {version} (expected {expected_version})")
    if count < 0:
        raise DataError(f"shard {path}: negative token count {count} in the header")
    expected = HEADER_BYTES + dtype.itemsize * count
    fix = "an interrupted copy or download? copy it again, or re-prepare it with `python -m data_prep`"
    if size < expected:
        raise DataError(f"shard {path}: truncated: {size:,} bytes, the header's {count:,} tokens need {expected:,}: {fix}")
    if size > expected:
        raise DataError(f"shard {path}: oversized: {size:,} bytes, the header's {count:,} tokens need {expected:,}: {fix}")
    return count, dtype


def open_shard(path: str | Path, vocab_size: int | None = None) -> np.memmap:
    """Memory-map a shard's tokens (read-only uint16 or uint32); with `vocab_size`, also check every id is below it."""
    count, dtype = read_format(path)
    if count == 0:  # np.memmap cannot map zero bytes
        return np.zeros(0, dtype=dtype)  # type: ignore[return-value]
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
    if vocab_size is not None:
        check_token_ids(tokens, vocab_size, str(path))
    return tokens


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """DataError at the first token id >= vocab_size, naming it and its position (token index in the shard).

    Scanned in blocks, so a memmap is never read whole into memory; it costs about one read of the data (docs/data.md,
    "Checks on open")."""
    for start in range(0, len(tokens), _CHECK_BLOCK):
        block = np.asarray(tokens[start : start + _CHECK_BLOCK])
        if block.size and int(block.max()) >= vocab_size:
            bad = start + int(np.argmax(block >= vocab_size))  # the first one, only on the (rare) failing block
            raise DataError(
                f"shard {where}: token id {int(tokens[bad])} at position {bad:,} is >= the vocab size {vocab_size}: "
                "it was made with another tokenizer, or damaged; re-tokenize it with `python -m data_prep`"
            )


def validate_shard(path: str | Path, vocab_size: int, sha256: str | None = None, num_tokens: int | None = None) -> None:
    """The full check: header, size, every token id, and (if given) the expected count and sha256."""
    tokens = open_shard(path, vocab_size)
    if num_tokens is not None and len(tokens) != num_tokens:
        raise DataError(f"shard {path}: holds {len(tokens):,} tokens, the manifest says {num_tokens:,}")
    if sha256 is not None and (actual := sha256_file(path)) != sha256:
        raise DataError(f"shard {path}: sha256 {actual} does not match the manifest's {sha256}: the file changed")


class ShardWriter:
    """Stream tokens into `<path>.tmp`; `close()` writes the header, renames to `path` and returns (count, sha256).
    The ids are uint16 for a vocab of up to 65,536, else uint32 (`token_dtype`).

    The sha256 covers the whole file, header first. The header holds the count, which is known only at the end, and a
    digest cannot be started before its first bytes, so close() hashes the finished file in one pass from the page cache:
    a small cost next to tokenizing that much (docs/data.md, "The shard format and the manifest").
    """

    def __init__(self, path: str | Path, vocab_size: int = 65536):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.num_tokens = 0
        self._file = open(self.tmp_path, "wb")
        self._file.write(b"\0" * HEADER_BYTES)  # placeholder until the count is known

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise DataError(f"shard {self.path}: token id {int(tokens.max())} is outside [0, {self.vocab_size})")
        if self.num_tokens + tokens.size > MAX_TOKENS:
            raise DataError(f"shard {self.path}: more than {MAX_TOKENS:,} tokens; use a smaller shard size")
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.num_tokens += tokens.size

    def close(self) -> tuple[int, str]:
        self._file.seek(0)
        self._file.write(make_header(self.num_tokens, self.dtype))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        sha256 = sha256_file(self.tmp_path)
        os.replace(self.tmp_path, self.path)
        return self.num_tokens, sha256

    def abort(self) -> None:
        """Drop the partial file."""
        if not self._file.closed:
            self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int = 65536) -> str:
    """Write one shard in one go (atomically); return its sha256."""
    writer = ShardWriter(path, vocab_size)
    try:
        writer.write(tokens)
    except BaseException:
        writer.abort()
        raise
    return writer.close()[1]

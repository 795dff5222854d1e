"""`python -m data_prep.tokenizer`: train a byte-level BPE tokenizer on the sources `python -m data_prep` reads.

    python -m data_prep.tokenizer --source shakespeare --vocab-size 2000 --out tokenizers/shakespeare-2k/tokenizer.json
    python -m data_prep --source shakespeare --tokenizer tokenizers/shakespeare-2k/tokenizer.json --out data/sp2k

GPT-2's recipe, with the `tokenizers` library: byte-level, so every byte is a token and no text is ever unknown; GPT-2's
split regex, no prefix space, no normalizer. Ids 0 and 1 are `<|endoftext|>` (the EOS data_prep puts after every
document) and `<|pad|>`, then the 256 bytes, then the merges in the order they were learned, up to --vocab-size ids in
all; a corpus too small for that many merges gives fewer (a warning says how many). The documents stream through the
trainer, which keeps word counts, never the corpus; the progress bar counts the characters read (the merges that
follow are not counted). The file is written under a temporary name and renamed into place: a bad input (source,
vocab size, an existing --out without --force) is one line and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_prep.sources import Source, resolve_source
from smollm2.data.tokenizer import EOS_TEXT, PAD_TEXT
from smollm2.errors import DataError

SPECIAL_TOKENS = [EOS_TEXT, PAD_TEXT]  # ids 0 and 1
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # the specials and the bytes: a vocab with no merges at all
MAX_VOCAB = 1 << 31  # ids are int32 in the tokenizers library; the shards store uint32 above 65,536


@dataclass
class TrainOptions:
    source: str
    vocab_size: int
    out: str
    text_field: str = "text"
    min_frequency: int = 2
    force: bool = False
    progress: bool = True


@dataclass
class Trained:
    out: Path
    vocab_size: int
    documents: int
    characters: int
    replaced_bytes: int
    seconds: float


def check_out(out: Path, force: bool) -> None:
    """Refuse, before reading anything, an --out that exists (unless --force), is a directory, or cannot be written."""
    if out.is_dir():
        raise DataError(f"--out {out} is a directory: name the file to write, e.g. {out / 'tokenizer.json'}")
    if (out.exists() or out.is_symlink()) and not force:
        raise DataError(f"--out {out} exists: choose another --out, or pass --force to replace it")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise DataError(f"cannot write --out {out}: {ancestor} is not a writable directory")


def check_options(opts: TrainOptions) -> None:
    if not MIN_VOCAB < opts.vocab_size < MAX_VOCAB:
        raise DataError(f"--vocab-size must be more than {MIN_VOCAB} (the 256 bytes and {', '.join(SPECIAL_TOKENS)}) "
                        f"and less than {MAX_VOCAB:,}, got {opts.vocab_size}")
    if opts.min_frequency < 1:
        raise DataError(f"--min-frequency must be >= 1, got {opts.min_frequency}")
    check_out(Path(opts.out), opts.force)


class Reading:
    """The source's texts, streamed to the trainer, counted, and shown on a progress bar."""

    def __init__(self, source: Source, bar: tqdm):
        self.source, self.bar = source, bar
        self.documents = self.characters = 0

    def __iter__(self) -> Iterator[str]:
        for text, ends_document in self.source.pieces():
            self.characters += len(text)
            self.documents += ends_document
            self.bar.update(len(text))
            yield text


def new_tokenizer():
    """An untrained byte-level BPE with GPT-2's pre-tokenizer, decoder and post-processor (no template tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train(opts: TrainOptions) -> Trained:
    """Train and write the tokenizer; return what was made."""
    from tokenizers import pre_tokenizers, trainers

    check_options(opts)
    source = resolve_source(opts.source, opts.text_field)  # a bad source fails here, before anything is written
    out = Path(opts.out)
    start = time.perf_counter()
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=opts.vocab_size, min_frequency=opts.min_frequency,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bar = tqdm(desc=f"reading {opts.source}", unit="char", unit_scale=True, file=sys.stderr,
               disable=None if opts.progress else True)  # None: off when stderr is not a terminal
    with bar:
        reading = Reading(source, bar)
        tok.train_from_iterator(reading, trainer=trainer)
    if reading.characters == 0:
        raise DataError(f"source {opts.source} holds no text ({reading.documents} empty documents): nothing to train on")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tok.save(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return Trained(out, tok.get_vocab_size(with_added_tokens=True), reading.documents, reading.characters,
                   source.replaced_bytes, time.perf_counter() - start)


def summary(result: Trained, asked: int) -> str:
    lines = [f"trained {result.out}: {result.vocab_size:,} ids ({EOS_TEXT} = 0, {PAD_TEXT} = 1) from "
             f"{result.documents:,} documents, {result.characters:,} characters, in {result.seconds:.1f} s"
             + (f"; {result.replaced_bytes:,} undecodable bytes replaced" if result.replaced_bytes else "")]
    if result.vocab_size < asked:
        lines.append(f"  warning: the corpus holds too few distinct pairs for {asked:,} ids; the tokenizer has "
                     f"{result.vocab_size:,}")
    lines.append(f"  use it: python -m data_prep --source ... --tokenizer {result.out}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> TrainOptions:
    p = argparse.ArgumentParser(prog="python -m data_prep.tokenizer", description=__doc__.split("\n\n")[0].strip("`"))
    p.add_argument("--source", default="shakespeare",
                   help="what python -m data_prep reads: shakespeare (default) | .txt/.md/.jsonl/.parquet[.gz] file, "
                        "dir or glob | hf:<name>[:cfg]")
    p.add_argument("--vocab-size", type=int, required=True, help="ids in all: the 2 special tokens, 256 bytes, merges")
    p.add_argument("--out", required=True, help="the tokenizer.json to write")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column / HF field holding the text")
    p.add_argument("--min-frequency", type=int, default=2, help="a pair seen fewer times is never merged (default 2)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    return TrainOptions(source=args.source, vocab_size=args.vocab_size, out=args.out, text_field=args.text_field,
                        min_frequency=args.min_frequency, force=args.force, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    print(summary(train(opts), opts.vocab_size), flush=True)
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)

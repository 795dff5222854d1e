"""`python -m bench.prep` (make bench-prep): data-prep throughput against raw tiktoken, same text, same cores.

raw : `encode_ordinary_batch(texts, num_threads=workers)` on the corpus already in memory (no reading, no writing)
prep: the whole `python -m data_prep` pipeline into a scratch directory (read the source, tokenize, write shards, hash,
      manifest)
ratio = raw seconds / prep seconds (prep throughput as a fraction of raw tiktoken's); best of --repeats, interleaved.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from data_prep.prep import PrepOptions, prepare
from data_prep.sources import resolve_source
from smollm2.data.tokenizer import get_tokenizer
from smollm2.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prep", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="shakespeare")
    p.add_argument("--workers", type=int, default=PrepOptions().workers)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--text-field", default="text")
    args = p.parse_args(argv)

    tokenizer = get_tokenizer()
    texts = [text for text, _ in resolve_source(args.source, args.text_field).pieces()]
    tokenizer.encode_batch(texts[:4], num_threads=args.workers)  # warm up the tokenizer
    raw_times, prep_times = [], []
    with tempfile.TemporaryDirectory(prefix="smollm2-bench-prep-") as out:
        for _ in range(args.repeats):
            start = time.perf_counter()
            raw_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts, num_threads=args.workers))
            raw_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = prepare(PrepOptions(source=args.source, out=out, text_field=args.text_field, workers=args.workers,
                                         force=True, progress=False))
            prep_times.append(time.perf_counter() - start)
    raw, prep = min(raw_times), min(prep_times)
    docs = result.manifest["documents"]
    eos = docs["train"] + docs["val"]
    print(f"source {args.source}: {len(texts):,} documents, {sum(map(len, texts)):,} characters, {raw_tokens:,} tokens "
          f"(+{eos:,} EOS), {args.workers} workers, best of {args.repeats}")
    print(f"raw tiktoken encode_ordinary_batch: {raw:.3f} s  {raw_tokens / raw:,.0f} tok/s")
    print(f"data_prep (read+tokenize+write):    {prep:.3f} s  {raw_tokens / prep:,.0f} tok/s")
    print(f"ratio (prep / raw throughput): {raw / prep:.2f}")
    return 0


if __name__ == "__main__":
    run_cli(main)

"""Our GPT-2 BPE (+ pad) as a Hugging Face `tokenizer.json`, built offline from the bundled ranks file.

tiktoken stores only ranks (token bytes -> id); a Hugging Face BPE needs a vocabulary of byte-level-unicode strings and the
ordered merge list. The merges are recovered from the ranks: a token of rank r is made, by BPE itself, from exactly two
tokens of lower rank, found by running BPE over its bytes with only the ranks below r. Listed in rank order, those merges
make the `tokenizers` BPE produce tiktoken's ids (tests/test_export.py checks it on mixed text). No network, no cache:
everything is written into the export folder.

    python -m smollm2.hf_tokenizer OUT_DIR     writes tokenizer.json, tokenizer_config.json, special_tokens_map.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from smollm2.data.tokenizer import EOS_ID, EOS_TEXT, PAD_ID, PAD_TEXT, bytes_to_unicode, get_tokenizer


def to_unicode(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """Run BPE (merge the adjacent pair whose concatenation has the lowest rank, as tiktoken does) over `token`'s bytes
    with only the ranks below `below`: for a token of that rank this stops at the two parts it is merged from."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_at = below, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best:
                best, best_at = rank, i
        if best_at < 0:
            break
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list, in rank order (rank = merge priority), from tiktoken's mergeable ranks."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two lower-ranked tokens: {parts}")
        merges.append((parts[0], parts[1]))
    return merges


def build_tokenizer() -> Tokenizer:
    """The `tokenizers` object: byte-level BPE with GPT-2's split regex, EOS and pad as special tokens."""
    ranks: dict[bytes, int] = get_tokenizer()._enc._mergeable_ranks  # tiktoken keeps the ranks it was built from
    vocab = {to_unicode(token): rank for token, rank in ranks.items()}
    vocab[EOS_TEXT], vocab[PAD_TEXT] = EOS_ID, PAD_ID
    merges = [(to_unicode(a), to_unicode(b)) for a, b in recover_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # GPT-2's pre-tokenizer: its split regex (the same alternatives as tiktoken's r50k pattern), no prefix space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOS_TEXT, special=True, normalized=False),
                            AddedToken(PAD_TEXT, special=True, normalized=False)])
    return tok


def save_hf_tokenizer(out_dir: str | Path, model_max_length: int) -> float:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`, which
    `transformers.AutoTokenizer.from_pretrained` loads (a PreTrainedTokenizerFast, no custom code). Returns the seconds
    the build took (the merge recovery is most of it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tok = build_tokenizer()
    took = time.perf_counter() - start
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOS_TEXT, "eos_token": EOS_TEXT, "unk_token": EOS_TEXT, "pad_token": PAD_TEXT}
    added = {str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, text in ((EOS_ID, EOS_TEXT), (PAD_ID, PAD_TEXT))}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length, "add_bos_token": False,
              "add_eos_token": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": added, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm2.hf_tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--model-max-length", type=int, default=2048)
    args = parser.parse_args(argv)
    took = save_hf_tokenizer(args.out_dir, args.model_max_length)
    print(f"wrote the tokenizer to {args.out_dir} (built in {took:.1f}s)")
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)

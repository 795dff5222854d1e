"""GPT-2 BPE through tiktoken, built offline from a ranks file bundled with the package, plus one pad token.

The ranks file is `smollm2/assets/gpt2.tiktoken` (the same ranks as tiktoken's r50k_base/gpt2, taken from the MIT-licensed
openai-whisper sdist) and is checked against its sha256 every time it is loaded: tiktoken's own `get_encoding("gpt2")` would
download it, which cannot work offline.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from smollm2.errors import UserError

RANKS_PATH = Path(__file__).parents[1] / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's split pattern (tiktoken's r50k_base / gpt2).
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

EOS_ID = 50256
PAD_ID = 50257
VOCAB_SIZE = 50258  # GPT-2's 50,257 + pad
EOS_TEXT = "<|endoftext|>"
PAD_TEXT = "<|pad|>"


class TokenizerError(UserError):
    pass


class Tokenizer:
    """encode / decode / encode_batch over GPT-2 BPE; EOS = 50256, PAD = 50257, vocab 50,258."""

    name = "gpt2"
    eos_id = EOS_ID
    pad_id = PAD_ID
    vocab_size = VOCAB_SIZE

    def __init__(self, ranks_path: str | Path = RANKS_PATH, expected_sha256: str = RANKS_SHA256):
        ranks_path = Path(ranks_path)
        if not ranks_path.is_file():
            raise TokenizerError(f"BPE ranks file not found: {ranks_path} (reinstall the package: pip install -e .)")
        digest = hashlib.sha256(ranks_path.read_bytes()).hexdigest()
        if digest != expected_sha256:
            raise TokenizerError(
                f"BPE ranks file {ranks_path} has sha256 {digest}, expected {expected_sha256}: the file is corrupt or "
                "not GPT-2's; restore it from the package (git checkout smollm2/assets/gpt2.tiktoken)"
            )
        ranks = load_tiktoken_bpe(str(ranks_path), expected_hash=expected_sha256)
        self._enc = tiktoken.Encoding(
            name=self.name,
            pat_str=R50K_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOS_TEXT: EOS_ID, PAD_TEXT: PAD_ID},
            explicit_n_vocab=VOCAB_SIZE,
        )

    def encode(self, text: str, *, eos: bool = False) -> list[int]:
        """Ordinary text -> ids (special-token text is encoded as plain text); `eos=True` appends EOS."""
        ids = self._enc.encode_ordinary(text)
        return ids + [EOS_ID] if eos else ids

    def encode_numpy(self, text: str, *, eos: bool = False) -> np.ndarray:
        """`encode` as a uint16 array, without the Python list in between (what data prep writes)."""
        ids = self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        if eos:
            ids = np.append(ids, EOS_ID)
        return ids.astype(np.uint16)

    def encode_batch(self, texts: list[str], *, num_threads: int = 8) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def token_bytes(self, token: int) -> bytes:
        """One token's bytes (a character may span tokens: streaming decodes these incrementally)."""
        return b"" if token >= EOS_ID else self._enc.decode_single_token_bytes(token)

    def decode(self, ids, *, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i < EOS_ID]
        return self._enc.decode(ids)


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The package's tokenizer (loaded and hash-checked once per process)."""
    return Tokenizer()

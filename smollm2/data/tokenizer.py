"""The tokenizers: GPT-2 BPE through tiktoken (the default), or any Hugging Face `tokenizer.json` (HFTokenizer).

GPT-2's is built offline from a ranks file bundled with the package, plus one pad token. The ranks file is
`smollm2/assets/gpt2.tiktoken` (the same ranks as tiktoken's r50k_base/gpt2, taken from the MIT-licensed openai-whisper
sdist) and is checked against its sha256 every time it is loaded: tiktoken's own `get_encoding("gpt2")` would download
it, which cannot work offline.

The tokenizer belongs to the data: a dataset prepared with `python -m data_prep --tokenizer PATH` holds a copy of its
`tokenizer.json`, the checkpoints trained on it carry one too, and the exports copy theirs. Anything without one (every
dataset and checkpoint made before) is GPT-2's. `dataset_tokenizer` and `folder_tokenizer` are the loaders.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from smollm2.data.manifest import read_manifest
from smollm2.data.shards import token_dtype
from smollm2.errors import DataError, UserError, one_line

RANKS_PATH = Path(__file__).parents[1] / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's split pattern (tiktoken's r50k_base / gpt2).
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

EOS_ID = 50256
PAD_ID = 50257
VOCAB_SIZE = 50258  # GPT-2's 50,257 + pad
EOS_TEXT = "<|endoftext|>"
PAD_TEXT = "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"  # a Hugging Face tokenizer's file: in a dataset, a checkpoint, an export
# Looked up, in this order, when no tokenizer_config.json beside the file names them (GPT-2/SmolLM2, Llama 3, Llama 2 /
# Mistral, Gemma). No EOS: refused, since every document must end with one. No pad: pad = EOS.
EOS_NAMES = (EOS_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
PAD_NAMES = (PAD_TEXT, "<pad>", "[PAD]", "<|padding|>")


class TokenizerError(UserError):
    pass


class Tokenizer:
    """encode / decode / encode_batch over GPT-2 BPE; EOS = 50256, PAD = 50257, vocab 50,258. `sha256` None: the bundled
    GPT-2 BPE, which no dataset or checkpoint needs a copy of."""

    name = "gpt2"
    eos_id = EOS_ID
    pad_id = PAD_ID
    vocab_size = VOCAB_SIZE
    sha256: str | None = None

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

    def describe(self) -> dict:
        """What a manifest records about it (as every GPT-2 manifest has)."""
        return {"name": self.name, "vocab_size": VOCAB_SIZE, "eos_id": EOS_ID, "ranks_sha256": RANKS_SHA256}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character table (what byte-level BPE vocabularies are written in): printable
    Latin-1 bytes stand for themselves, the others are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece-style byte tokens


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library, with the GPT-2 Tokenizer's interface.

    As with GPT-2's, documents are encoded as ordinary text: no BOS or other template tokens, and special-token text in a
    document stays text (`encode_special_tokens`), so only data_prep puts an EOS into the data. The vocab size is the
    largest id + 1 (what the embedding must cover). EOS and pad come from the arguments (what a manifest or meta.json
    recorded), else from a `tokenizer_config.json` beside the file, else from the well-known names (EOS_NAMES,
    PAD_NAMES); a tokenizer with no EOS is refused, one without a pad token pads with EOS."""

    def __init__(self, path: str | Path, *, name: str | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, expected_sha256: str | None = None):
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        path = path / TOKENIZER_FILE if path.is_dir() else path
        try:
            self.raw = path.read_bytes()
        except OSError as err:
            raise TokenizerError(f"cannot read the tokenizer {path}: {err.strerror or err}") from None
        self.path, self.sha256 = path, hashlib.sha256(self.raw).hexdigest()
        if expected_sha256 is not None and self.sha256 != expected_sha256:
            raise TokenizerError(f"{path} has sha256 {self.sha256}, expected {expected_sha256} (as recorded when it was "
                                 "made): the file was changed or replaced since")
        try:
            self._tok = Backend.from_str(self.raw.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - not UTF-8, not JSON, not a tokenizer: one line
            raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json ({one_line(err)})") from None
        self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        self.name = name or (path.resolve().parent.name if path.name == TOKENIZER_FILE else path.stem) or "tokenizer"
        config = self._config(path.with_name("tokenizer_config.json"))
        self.eos_id = eos_id if eos_id is not None else self._find(vocab, config.get("eos_token"), EOS_NAMES)
        if self.eos_id is None:
            raise TokenizerError(
                f"{path} has no EOS token (none of {', '.join(EOS_NAMES)}, and no eos_token in a tokenizer_config.json "
                f"beside it): every document must end with one; add {EOS_TEXT} as a special token, or train a tokenizer "
                "with python -m data_prep.tokenizer")
        found_pad = self._find(vocab, config.get("pad_token"), PAD_NAMES)
        self.pad_id = pad_id if pad_id is not None else self.eos_id if found_pad is None else found_pad
        added = self._tok.get_added_tokens_decoder()  # id -> AddedToken
        self._special = {i for i, token in added.items() if token.special} | {self.eos_id, self.pad_id}
        spec = json.loads(self.raw)
        self._byte_level = '"ByteLevel"' in json.dumps(spec.get("decoder"))
        self._unk = (spec.get("model") or {}).get("unk_token")  # WordLevel / WordPiece / Unigram may have one
        self.dtype = token_dtype(self.vocab_size)

    @staticmethod
    def _config(path: Path) -> dict:
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}

    @staticmethod
    def _find(vocab: dict[str, int], configured, names: tuple[str, ...]) -> int | None:
        """The id of the configured token (a string, or transformers' {"content": ...}), else of the first known name."""
        configured = configured.get("content") if isinstance(configured, dict) else configured
        for name in ([configured] if isinstance(configured, str) else []) + list(names):
            if name in vocab:
                return vocab[name]
        return None

    def encode(self, text: str, *, eos: bool = False) -> list[int]:
        """Ordinary text -> ids (special-token text is encoded as plain text); `eos=True` appends EOS."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ids + [self.eos_id] if eos else ids

    def encode_numpy(self, text: str, *, eos: bool = False) -> np.ndarray:
        """`encode` as an array of the shard dtype (uint16 while the vocab fits, else uint32): what data prep writes."""
        return np.asarray(self.encode(text, eos=eos), dtype=self.dtype)

    def encode_batch(self, texts: list[str], *, num_threads: int = 8) -> list[list[int]]:
        """Every text's ids (`tokenizers` picks its own threads: num_threads is GPT-2's knob)."""
        return [encoding.ids for encoding in self._tok.encode_batch(texts, add_special_tokens=False)]

    def token_bytes(self, token: int) -> bytes:
        """One token's bytes, for streaming (special and unknown ids: none). Byte-level vocabularies map back exactly;
        otherwise `<0xNN>` is that byte and `▁` a space (SentencePiece's conventions)."""
        piece = None if token in self._special else self._tok.id_to_token(token)
        if piece is None:
            return b""
        if self._byte_level:
            table = _unicode_to_byte()
            return b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece)
        if match := _BYTE_FALLBACK.match(piece):
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def decode(self, ids, *, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if skip_special:
            ids = [i for i in ids if i not in self._special]
        return self._tok.decode(ids, skip_special_tokens=False)

    def describe(self) -> dict:
        """What a manifest and a checkpoint's meta.json record about it."""
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "sha256": self.sha256}

    def save(self, out_dir: str | Path, model_max_length: int) -> None:
        """This tokenizer as `transformers.AutoTokenizer` loads it (PreTrainedTokenizerFast, no custom code):
        tokenizer.json byte for byte, a tokenizer_config.json and special_tokens_map.json naming EOS and pad."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / TOKENIZER_FILE).write_bytes(self.raw)
        eos, pad = self._tok.id_to_token(self.eos_id), self._tok.id_to_token(self.pad_id)
        special = {"bos_token": eos, "eos_token": eos, "unk_token": self._unk or eos, "pad_token": pad}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                  "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, **special}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The bundled GPT-2 tokenizer (loaded and hash-checked once per process): the default, and what a dataset or a
    checkpoint without a `tokenizer.json` was made with."""
    return Tokenizer()


def recorded_tokenizer(path: str | Path) -> tuple[Path, dict] | None:
    """A prepared dataset's `tokenizer.json` and its manifest entry, or None for GPT-2's (no manifest, or a manifest
    without a tokenizer sha256: every dataset made before). DataError if the manifest names one that is missing."""
    path = Path(path)
    manifest = read_manifest(path) if path.is_dir() else None
    entry = (manifest or {}).get("tokenizer", {})
    if "sha256" not in entry:
        return None
    file = path / TOKENIZER_FILE
    if not file.is_file():
        raise DataError(f"{file} is missing: {path / 'manifest.json'} says the data was tokenized with it; copy it back "
                        f"or re-prepare the data (python -m data_prep --tokenizer ... --out {path})")
    return file, entry


def tokenizer_to_save(data_path: str | Path) -> tuple[bytes, dict] | None:
    """What a checkpoint of a run on this dataset carries: (the bytes of its `tokenizer.json`, its description for
    meta.json), checked against the manifest's sha256; None for GPT-2's."""
    found = recorded_tokenizer(data_path)
    if found is None:
        return None
    file, entry = found
    raw = file.read_bytes()
    if (digest := hashlib.sha256(raw).hexdigest()) != entry["sha256"]:
        raise DataError(f"{file} has sha256 {digest}, the manifest says {entry['sha256']}: the dataset's tokenizer "
                        "changed after the data was prepared; re-prepare it")
    return raw, {key: entry.get(key) for key in ("name", "vocab_size", "eos_id", "pad_id", "sha256")}


def dataset_tokenizer(path: str | Path):
    """The tokenizer a prepared dataset was made with: its `tokenizer.json` (checked against the manifest's sha256) when
    the manifest names one, else GPT-2's (every dataset without one, llm.c directories included)."""
    found = recorded_tokenizer(path)
    if found is None:
        return get_tokenizer()
    file, entry = found
    return HFTokenizer(file, name=entry.get("name"), eos_id=entry["eos_id"], pad_id=entry.get("pad_id"),
                       expected_sha256=entry["sha256"])


def folder_tokenizer(folder: str | Path, recorded: dict | None = None):
    """The tokenizer of a checkpoint or an export folder: its `tokenizer.json` (name, EOS, pad and sha256 as `recorded`
    in its meta.json / smollm2_export.json) if it holds one, else GPT-2's (every checkpoint saved before)."""
    file = Path(folder) / TOKENIZER_FILE
    if not file.is_file():
        return get_tokenizer()
    recorded = recorded or {}
    return HFTokenizer(file, name=recorded.get("name"), eos_id=recorded.get("eos_id"), pad_id=recorded.get("pad_id"),
                       expected_sha256=recorded.get("sha256"))


class TokenizerMismatch(DataError):
    pass


def check_resume_tokenizer(recorded: dict | None, tok, checkpoint: str | Path, data_path: str | Path) -> None:
    """A resume trains on data of the checkpoint's tokenizer: `recorded` (its meta.json's "tokenizer"; None: GPT-2's, as
    every checkpoint saved before) must have the sha256 of `tok`, the dataset's. TokenizerMismatch otherwise."""
    saved = (recorded or {}).get("sha256")
    if saved == tok.sha256:
        return
    what = lambda name, sha: f"{name} (sha256 {sha[:12]}...)" if sha else "the bundled GPT-2 BPE"
    prep = f"--tokenizer {Path(checkpoint) / TOKENIZER_FILE}" if saved else "without --tokenizer"
    raise TokenizerMismatch(
        f"{checkpoint} was trained on data tokenized with {what((recorded or {}).get('name'), saved)}, but {data_path} "
        f"is tokenized with {what(tok.name, tok.sha256)}: resume on data prepared with the checkpoint's tokenizer "
        f"(python -m data_prep {prep} ...), or start a new train.run_dir")

import hashlib
import json
import re
import shutil

import numpy as np
import pytest
import tiny

from smollm2.data.tokenizer import (
    EOS_ID,
    PAD_ID,
    RANKS_PATH,
    HFTokenizer,
    Tokenizer,
    TokenizerError,
    TokenizerMismatch,
    check_resume_tokenizer,
    dataset_tokenizer,
    folder_tokenizer,
    get_tokenizer,
)
from smollm2.serve.generate import TextStream


def test_hello_world():
    assert get_tokenizer().encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("text", [
    "plain ASCII text, with punctuation!? and   spaces\n\nand newlines",
    "Unicode: naïve café, Straße, Ελληνικά, 日本語のテキスト, עברית",
    "emoji 🤖🎉👩‍👩‍👧‍👦 and flags 🇫🇷",
    "",
])
def test_round_trip(text):
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_vocab():
    tok = get_tokenizer()
    assert tok.vocab_size == 50258 and tok.eos_id == EOS_ID == 50256 and tok.pad_id == PAD_ID == 50257
    assert tok.encode("hi", eos=True)[-1] == EOS_ID
    # special-token text in a document is plain text, never the special id
    assert EOS_ID not in tok.encode("<|endoftext|>")
    assert tok.decode([15496, EOS_ID, PAD_ID, 995]) == "Hello world"
    assert tok.decode([15496, EOS_ID], skip_special=False) == "Hello<|endoftext|>"


def test_numpy_encode_matches_list_encode():
    tok = get_tokenizer()
    for text in ["Hello world", "a <|endoftext|> in a document is plain text", "emoji 🤖", ""]:
        ids = tok.encode_numpy(text, eos=True)
        assert ids.dtype.name == "uint16" and ids.tolist() == tok.encode(text, eos=True)


def test_batch_encode_matches_single():
    tok = get_tokenizer()
    texts = ["one document", "another, longer document with more words", "три"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_wrong_hash_raises(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    shutil.copy(RANKS_PATH, bad)
    with open(bad, "ab") as f:
        f.write(b"x")
    with pytest.raises(TokenizerError, match="sha256"):
        Tokenizer(bad)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer(tmp_path / "missing.tiktoken")


# ------------------------------------------------------------------------------- any Hugging Face tokenizer.json

CORPUS = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak.\n\n  trailing  \n",
          "Unicode: naïve café, 東京, emoji \U0001f600 and tabs\tand\r\nCRLF.", "numbers 1234567890 3.14159"] * 5
MIXED = "  Héllo wörld — naïve café 日本語 🙂👩‍👩‍👧\r\n\tdef f(x):\n        return x ** 2  \u00a0 I'll end  \n"


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    return tiny.train_tokenizer(tmp_path_factory.mktemp("tok") / "small-bpe" / "tokenizer.json", CORPUS, 400)


def test_a_tokenizer_json_has_the_gpt2_interface(bpe_file):
    tok = HFTokenizer(bpe_file)
    assert (tok.name, tok.eos_id, tok.pad_id) == ("small-bpe", 0, 1) and 258 < tok.vocab_size <= 400
    assert tok.sha256 == hashlib.sha256(bpe_file.read_bytes()).hexdigest() and tok.dtype == np.uint16
    assert tok.describe() == {"name": "small-bpe", "vocab_size": tok.vocab_size, "eos_id": 0, "pad_id": 1,
                              "sha256": tok.sha256}
    for text in (MIXED, CORPUS[0], ""):
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.encode(text, eos=True) == ids + [0]
        assert tok.encode_numpy(text, eos=True).tolist() == ids + [0]
    assert tok.encode_batch(CORPUS[:3]) == [tok.encode(t) for t in CORPUS[:3]]
    assert 0 not in tok.encode("<|endoftext|> in a document is plain text")  # as GPT-2's encode_ordinary
    assert tok.decode([0, *tok.encode("hi"), 1]) == "hi" and tok.decode([0], skip_special=False) == "<|endoftext|>"


def test_streaming_a_tokenizer_json_gives_its_decode(bpe_file):
    """TextStream (generate's streaming) over the token bytes: each character printed once, whole; all = decode."""
    tok = HFTokenizer(bpe_file)
    ids = tok.encode(MIXED) + [0]
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == MIXED and "\ufffd" not in "".join(pieces)
    assert any(piece == "" for piece in pieces)  # an emoji spans tokens: nothing printed until its last byte


def test_eos_and_pad_come_from_the_names_a_config_beside_it_or_the_caller(tmp_path):
    plain = tiny.word_level_tokenizer(tmp_path / "a" / "tokenizer.json", 10, eos="</s>")
    tok = HFTokenizer(plain.parent)  # a folder holding a tokenizer.json
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (11, 11, 12)  # no pad token: pads with EOS
    custom = tiny.word_level_tokenizer(tmp_path / "b" / "tokenizer.json", 10, eos="<|my_end|>")
    (custom.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|my_end|>"},
                                                                     "pad_token": "w3"}))
    assert (HFTokenizer(custom).eos_id, HFTokenizer(custom).pad_id) == (11, 4)
    assert HFTokenizer(custom, eos_id=5, pad_id=6, name="x").describe()["eos_id"] == 5
    assert HFTokenizer(tiny.word_level_tokenizer(tmp_path / "big.json", 70_000)).dtype == np.uint32


@pytest.mark.parametrize("make, message", [
    (lambda p: tiny.word_level_tokenizer(p, 10, eos=None), "has no EOS token (none of <|endoftext|>"),
    (lambda p: p.write_text('{"not": "a tokenizer"}'), "is not a Hugging Face tokenizer.json"),
    (lambda p: None, "cannot read the tokenizer"),
])
def test_a_bad_tokenizer_json_is_one_line(tmp_path, make, message):
    path = tmp_path / "tokenizer.json"
    make(path)
    with pytest.raises(TokenizerError, match=re.escape(message)) as err:
        HFTokenizer(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_changed_tokenizer_json_is_refused(bpe_file):
    with pytest.raises(TokenizerError, match=r"expected 0{64} \(as recorded when it was made\)"):
        HFTokenizer(bpe_file, expected_sha256="0" * 64)


def test_without_a_tokenizer_json_it_is_gpt2s(tmp_path, bpe_file):
    assert dataset_tokenizer(tmp_path) is get_tokenizer() and folder_tokenizer(tmp_path) is get_tokenizer()
    (tmp_path / "tokenizer.json").write_bytes(bpe_file.read_bytes())
    assert folder_tokenizer(tmp_path, {"name": "mine", "sha256": HFTokenizer(bpe_file).sha256}).name == "mine"


def test_a_resume_needs_the_checkpoints_tokenizer(bpe_file):
    hf, gpt2 = HFTokenizer(bpe_file), get_tokenizer()
    check_resume_tokenizer(None, gpt2, "ckpt", "data")  # a checkpoint without one is GPT-2's
    check_resume_tokenizer(hf.describe(), hf, "ckpt", "data")
    with pytest.raises(TokenizerMismatch, match=r"ckpt was trained on data tokenized with the bundled GPT-2 BPE, but "
                                                r"data is tokenized with small-bpe \(sha256 "):
        check_resume_tokenizer(None, hf, "ckpt", "data")
    with pytest.raises(TokenizerMismatch, match=r"tokenized with small-bpe .* but data is tokenized with the bundled "
                                                r"GPT-2 BPE: .*python -m data_prep --tokenizer ckpt/tokenizer.json"):
        check_resume_tokenizer(hf.describe(), gpt2, "ckpt", "data")

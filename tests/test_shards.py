"""The .bin shard format: llm.c byte compatibility, memory-mapped reads, every violation a DataError naming the file."""

import hashlib

import numpy as np
import pytest

from smollm2.data.shards import (
    HEADER_BYTES,
    MAGIC,
    MAGIC_U32,
    ShardWriter,
    open_shard,
    read_header,
    validate_shard,
    write_shard,
)
from smollm2.errors import DataError


def write_llmc_shard(path, tokens, magic=20240520, version=1, count=None):
    """A minimal independent writer, as llm.c's fineweb.py does it: 256 int32 header, then uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_reads_a_shard_written_by_an_independent_writer(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=5000)
    path = tmp_path / "fineweb_train_000001.bin"
    write_llmc_shard(path, tokens)
    assert read_header(path) == 5000
    mapped = open_shard(path, vocab_size=50257)
    assert isinstance(mapped, np.memmap)  # mapped, not loaded
    assert mapped.dtype == np.uint16 and mapped.offset == HEADER_BYTES
    np.testing.assert_array_equal(mapped, tokens)


def test_shard_writer_streams_to_tmp_then_renames_and_hashes_the_file(tmp_path):
    tokens = np.arange(10_000) % 50258
    path = tmp_path / "train_000000.bin"
    writer = ShardWriter(path, vocab_size=50258)
    for start in range(0, len(tokens), 3000):
        writer.write(tokens[start : start + 3000])
        assert writer.tmp_path.exists() and not path.exists()  # never visible under its name while partial
    count, sha256 = writer.close()
    assert count == 10_000 and not writer.tmp_path.exists()
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    reference = tmp_path / "reference.bin"
    write_llmc_shard(reference, tokens)
    assert path.read_bytes() == reference.read_bytes()  # byte-identical to the llm.c layout
    assert path.stat().st_size == 1024 + 2 * 10_000


def test_aborted_writer_leaves_nothing(tmp_path):
    path = tmp_path / "train_000000.bin"
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as writer:
            writer.write(np.arange(100))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_ids_outside_the_vocab(tmp_path):
    writer = ShardWriter(tmp_path / "x.bin", vocab_size=100)
    with pytest.raises(DataError, match="token id 100 is outside"):
        writer.write(np.array([1, 100]))
    writer.abort()


def test_empty_shard(tmp_path):
    path = tmp_path / "empty.bin"
    write_shard(path, np.zeros(0, dtype=np.uint16))
    assert read_header(path) == 0 and len(open_shard(path, 50258)) == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: write_llmc_shard(p, [1, 2, 3], magic=1234), "bad magic 1234"),
        (lambda p: write_llmc_shard(p, [1, 2, 3], version=2), "unsupported version 2"),
        (lambda p: write_llmc_shard(p, [1, 2, 3], count=4), "truncated: 1,030 bytes"),
        (lambda p: write_llmc_shard(p, [1, 2, 3], count=2), "oversized: 1,030 bytes"),
        (lambda p: write_llmc_shard(p, [1, 2, 3], count=-1), "negative token count"),
        (lambda p: p.write_bytes(b"\x00" * 100), "truncated header"),
        (lambda p: None, "file not found"),
    ],
)
def test_every_violation_is_a_data_error_naming_the_file(tmp_path, make, message):
    path = tmp_path / "bad_shard.bin"
    make(path)
    with pytest.raises(DataError, match=message) as err:
        open_shard(path)
    assert str(path) in str(err.value)


def test_checked_read_finds_ids_beyond_the_vocab(tmp_path):
    path = tmp_path / "other_tokenizer.bin"
    write_llmc_shard(path, [5, 50256, 60000, 7])
    open_shard(path)  # unchecked: header only
    with pytest.raises(DataError, match=r"token id 60000 at position 2 is >= the vocab size 50258") as err:
        open_shard(path, vocab_size=50258)
    assert str(path) in str(err.value)


def test_validate_checks_count_and_sha256(tmp_path):
    path = tmp_path / "s.bin"
    sha256 = write_shard(path, np.arange(50))
    validate_shard(path, 50258, sha256=sha256, num_tokens=50)
    with pytest.raises(DataError, match="the manifest says 51"):
        validate_shard(path, 50258, num_tokens=51)
    with pytest.raises(DataError, match="does not match the manifest"):
        validate_shard(path, 50258, sha256="0" * 64)
    assert MAGIC == 20240520


def test_the_id_scan_reports_the_first_bad_id_in_any_block(tmp_path, monkeypatch):
    """The scan goes block by block (memory stays bounded); the position is the token index in the whole shard."""
    import smollm2.data.shards

    monkeypatch.setattr(smollm2.data.shards, "_CHECK_BLOCK", 64)
    tokens = np.arange(1000, dtype=np.uint16) % 50257
    tokens[[700, 900]] = 50258, 65535
    path = tmp_path / "s.bin"
    write_shard(path, tokens)
    with pytest.raises(DataError, match=r"token id 50258 at position 700 is >= the vocab size 50258"):
        open_shard(path, vocab_size=50258)
    open_shard(path, vocab_size=65536)  # a larger vocab covers every uint16


def test_a_vocab_over_65536_is_written_as_uint32_under_llmcs_uint32_header(tmp_path):
    """uint16 while the vocab fits; above, uint32 with the header llm.c's Python writer gives uint32 tokens (magic
    20240801, version 7), which an independent writer's file matches byte for byte and the reader maps as uint32."""
    tokens = np.array([0, 65535, 65536, 99_999, 7])
    path = tmp_path / "train_000000.bin"
    sha256 = write_shard(path, tokens, vocab_size=100_000)
    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 4 * len(tokens) and sha256 == hashlib.sha256(raw).hexdigest()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [MAGIC_U32, 7, 5] and not header[3:].any()
    reference = np.zeros(256, dtype=np.int32)
    reference[:3] = 20240801, 7, len(tokens)
    assert raw == reference.tobytes() + tokens.astype("<u4").tobytes()
    assert read_header(path) == 5
    mapped = open_shard(path, vocab_size=100_000)
    assert mapped.dtype == np.dtype("<u4") and mapped.tolist() == tokens.tolist()
    with pytest.raises(DataError, match="token id 99999 at position 3 is >= the vocab size 70000"):
        open_shard(path, vocab_size=70_000)
    write_shard(tmp_path / "small.bin", tokens[:1], vocab_size=65_536)  # the largest vocab that still fits uint16
    assert (tmp_path / "small.bin").stat().st_size == HEADER_BYTES + 2


def test_a_uint32_header_of_another_version_is_refused(tmp_path):
    path = tmp_path / "bad_shard.bin"
    write_llmc_shard(path, [1, 2, 3], magic=MAGIC_U32, version=1)
    with pytest.raises(DataError, match=r"unsupported version 1 \(expected 7, uint32 tokens\)"):
        open_shard(path)

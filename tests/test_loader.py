"""The loader: one global window order, disjoint per-rank slices, exact resume at another world size."""

import json
import threading
import time

import numpy as np
import pytest
import torch

from smollm2.data import Dataset, TrainLoader, ValWindows
from smollm2.data.manifest import INCOMPLETE_MARKER
from smollm2.data.shards import write_shard
from smollm2.errors import DataError

SEQ_LEN = 8
TRAIN_SIZES = (1000, 1201)  # two shards: windows span the boundary
N_WINDOWS = (sum(TRAIN_SIZES) - 1) // SEQ_LEN  # 275


@pytest.fixture
def dataset_dir(tmp_path):
    """An llm.c-style directory (no manifest) whose token at stream position p is p: a window shows its own id."""
    start = 0
    for i, size in enumerate(TRAIN_SIZES):
        write_shard(tmp_path / f"tiny_train_{i:06d}.bin", np.arange(start, start + size))
        start += size
    write_shard(tmp_path / "tiny_val_000000.bin", np.arange(40_000, 40_100))
    return tmp_path


@pytest.fixture
def dataset(dataset_dir):
    return Dataset.open(dataset_dir)


def loader(dataset, micro_batch, grad_accum, rank=0, world_size=1, seed=0, prefetch=0):
    return TrainLoader(dataset, SEQ_LEN, micro_batch, grad_accum, rank, world_size, seed, prefetch=prefetch)


def window_ids(batches):
    """Window ids of a step's tensors, checking each is the window's tokens [w*T, w*T + T + 1)."""
    ids = []
    for inputs, targets in batches:
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == targets.shape
        for x, y in zip(inputs, targets):
            w = int(x[0]) // SEQ_LEN
            torch.testing.assert_close(x, torch.arange(w * SEQ_LEN, w * SEQ_LEN + SEQ_LEN))
            torch.testing.assert_close(y, x + 1)
            ids.append(w)
    return ids


def test_dataset_open(dataset):
    assert dataset.train_tokens == sum(TRAIN_SIZES) and dataset.val_tokens == 100 and dataset.manifest is None
    assert loader(dataset, 1, 1).windows_per_epoch == N_WINDOWS


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_are_disjoint_and_an_epoch_covers_every_window_once(dataset, world_size):
    micro_batch, grad_accum = 2, 3
    ranks = [loader(dataset, micro_batch, grad_accum, r, world_size, seed=11) for r in range(world_size)]
    per_step = micro_batch * grad_accum * world_size
    steps = -(-N_WINDOWS // per_step) + 1  # past one epoch
    stream = []
    for step in range(steps):
        taken = [w for r in range(world_size) for w in window_ids(ranks[r].next_step())]  # also checks the tokens
        assert len(set(taken)) == per_step or step * per_step + per_step > N_WINDOWS
        stream.extend(taken)
    assert sorted(stream[:N_WINDOWS]) == list(range(N_WINDOWS))  # the first epoch: each window exactly once
    assert sorted(stream[N_WINDOWS : 2 * N_WINDOWS]) == sorted(set(stream[N_WINDOWS : 2 * N_WINDOWS]))
    # the global order is the same at any world size, and depends on the seed
    single = loader(dataset, 1, 1, seed=11)
    np.testing.assert_array_equal(stream, single.stream_windows(0, len(stream)))
    assert not np.array_equal(stream[:N_WINDOWS], loader(dataset, 1, 1, seed=12).stream_windows(0, N_WINDOWS))


def test_epochs_reshuffle_deterministically(dataset):
    a, b = loader(dataset, 1, 1, seed=3), loader(dataset, 1, 1, seed=3)
    epoch0, epoch1 = a.stream_windows(0, N_WINDOWS), a.stream_windows(N_WINDOWS, N_WINDOWS)
    assert sorted(epoch1) == list(range(N_WINDOWS)) and not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(b.stream_windows(N_WINDOWS - 5, 10), np.concatenate([epoch0[-5:], epoch1[:5]]))


def run_steps(loaders, steps):
    """The global stream the ranks consume in `steps` steps (ranks concatenated in rank order per step)."""
    taken = []
    for _ in range(steps):
        for ld in loaders:
            taken.extend(window_ids(ld.next_step()))
    return taken


@pytest.mark.parametrize("new_world, new_micro, new_accum", [(3, 3, 1), (1, 1, 5), (2, 2, 2)])
def test_resume_at_another_world_size_continues_the_global_stream(dataset, new_world, new_micro, new_accum):
    seed = 5
    before = [loader(dataset, 2, 2, r, 2, seed, prefetch=2) for r in range(2)]  # G = 8
    taken = run_steps(before, 30)  # 240 windows: the next resume crosses into epoch 1
    states = [ld.state_dict() for ld in before]
    assert states[0] == states[1] and states[0]["consumed_windows"] == 240
    json.dumps(states[0])  # plain data
    for ld in before:
        ld.close()

    after = [loader(dataset, new_micro, new_accum, r, new_world, seed, prefetch=2) for r in range(new_world)]
    for ld in after:
        ld.load_state_dict(states[0])
    taken += run_steps(after, 12)
    reference = loader(dataset, 1, 1, seed=seed).stream_windows(0, len(taken))
    assert taken == reference.tolist()  # none skipped, none repeated, same order as an uninterrupted run
    assert after[0].consumed_windows == 240 + 12 * new_world * new_micro * new_accum
    for ld in after:
        ld.close()


def test_prefetch_is_deterministic_and_reset_by_load_state_dict(dataset):
    sync, ahead = loader(dataset, 3, 2, prefetch=0, seed=1), loader(dataset, 3, 2, prefetch=3, seed=1)
    first = [sync.next_step() for _ in range(4)]
    for step in first:
        for (x0, y0), (x1, y1) in zip(step, ahead.next_step()):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    ahead.load_state_dict({**ahead.state_dict(), "consumed_windows": 6})  # back to step 1; the queue held steps 4..
    assert window_ids(ahead.next_step()) == window_ids(first[1])
    ahead.close()


@pytest.mark.timeout(60)  # the backstop deadline, should next_step() or close() hang (the thread method dumps stacks)
def test_an_exception_in_the_prefetch_thread_reaches_the_caller(dataset, monkeypatch):
    read, readers = dataset.train.read, []

    def read_then_fail(start, length):
        readers.append(threading.current_thread().name)
        if len(readers) > 2:
            raise DataError("shard read failed: disk gone")
        return read(start, length)

    monkeypatch.setattr(dataset.train, "read", read_then_fail)
    start = time.monotonic()
    ld = loader(dataset, 1, 2, prefetch=2)  # two reads a step: step 0 is built whole, step 1 fails
    assert len(window_ids(ld.next_step())) == 2
    with pytest.raises(DataError, match="disk gone"):
        ld.next_step()
    with pytest.raises(DataError, match="disk gone"):  # raised again, not a wait on a thread that has exited
        ld.next_step()
    assert set(readers) == {"loader-prefetch"}  # the reads, and the failure, happened in the background thread
    assert ld.consumed_windows == 2  # the failed step was not counted
    ld.close()
    assert time.monotonic() - start < 10, "next_step() / close() took too long"


def test_state_must_match_the_run(dataset, dataset_dir):
    state = loader(dataset, 2, 2, seed=1).state_dict()
    with pytest.raises(DataError, match="seed=1, this run has 2"):
        loader(dataset, 2, 2, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len=8, this run has 16"):
        TrainLoader(dataset, 16, 2, 2, 0, 1, seed=1).load_state_dict(state)
    write_shard(dataset_dir / "tiny_train_000002.bin", np.arange(10))  # other data: more windows, another fingerprint
    with pytest.raises(DataError, match="windows_per_epoch|data_fingerprint"):
        loader(Dataset.open(dataset_dir), 2, 2, seed=1).load_state_dict(state)


def test_val_windows(dataset):
    val = ValWindows(dataset, SEQ_LEN, num_windows=5)
    assert val.windows.shape == (5, SEQ_LEN + 1)
    torch.testing.assert_close(val.windows[2], torch.arange(40_016, 40_025))
    torch.testing.assert_close(val.rank_windows(1, 2), val.windows[[1, 3]])
    assert ValWindows(dataset, SEQ_LEN, num_windows=1000).num_windows == (100 - 1) // SEQ_LEN
    with pytest.raises(DataError, match="fewer than one window"):
        ValWindows(dataset, 128, num_windows=4)


def test_errors_say_how_to_fix(tmp_path, dataset_dir):
    with pytest.raises(DataError, match="run `make prep`"):
        Dataset.open(tmp_path / "missing")
    with pytest.raises(DataError, match="fewer than one window"):
        TrainLoader(Dataset.open(dataset_dir), 4096, 1, 1, 0, 1, seed=0)
    (dataset_dir / INCOMPLETE_MARKER).write_text("")
    with pytest.raises(DataError, match="did not finish"):
        Dataset.open(dataset_dir)
    (dataset_dir / INCOMPLETE_MARKER).unlink()
    manifest = {"format_version": 1, "tokenizer": {"vocab_size": 50258},
                "shards": [{"file": "train_000000.bin", "split": "train", "tokens": 5, "sha256": "0"}]}
    (dataset_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="listed in .* but missing"):
        Dataset.open(dataset_dir)


def test_llmc_shard_with_an_id_beyond_the_vocab_is_refused_on_open(tmp_path):
    """No manifest vouches for an llm.c directory's ids: an id >= the vocab is one line naming the file, the id and its
    offset when the dataset is opened, not an IndexError in the embedding later."""
    tokens = np.arange(1000, dtype=np.uint16) % 50257
    tokens[737] = 50300
    write_shard(tmp_path / "fineweb_train_000001.bin", tokens)
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(100, dtype=np.uint16))
    with pytest.raises(DataError) as err:
        Dataset.open(tmp_path, vocab_size=50258)
    message = str(err.value)
    assert "\n" not in message and "fineweb_train_000001.bin" in message
    assert "token id 50300 at position 737 is >= the vocab size 50258" in message


def test_a_manifest_shard_changed_after_prep_is_refused_on_open(tmp_path):
    """A manifest vouches for the ids data_prep wrote, not for a shard replaced since (same size, so the header and
    size checks pass): the open-time scan covers manifest datasets too."""
    write_shard(tmp_path / "train_000000.bin", np.arange(500, dtype=np.uint16))
    write_shard(tmp_path / "val_000000.bin", np.arange(100, dtype=np.uint16))
    manifest = {"format_version": 1, "tokenizer": {"vocab_size": 50258},
                "shards": [{"file": "train_000000.bin", "split": "train", "tokens": 500, "sha256": "0"},
                           {"file": "val_000000.bin", "split": "val", "tokens": 100, "sha256": "0"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert Dataset.open(tmp_path).train_tokens == 500
    tokens = np.arange(100, dtype=np.uint16)
    tokens[42] = 65535
    write_shard(tmp_path / "val_000000.bin", tokens)
    with pytest.raises(DataError, match=r"val_000000.bin: token id 65535 at position 42 is >= the vocab size 50258"):
        Dataset.open(tmp_path)

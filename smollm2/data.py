"""Training windows over token shards, in one global deterministic order, sliced per rank.

The train shards are read as one concatenated token stream. Window i is tokens [i*T, i*T + T + 1) of it, T = seq_len:
the stride is T, so consecutive windows share one token and every token is a target exactly once per epoch. There are
N = (train_tokens - 1) // T windows per epoch.

The global stream of windows: stream index g is window `order(epoch)[g % N]` with epoch = g // N, where order(epoch)
is a permutation of range(N) drawn from numpy's PCG64 seeded by (seed, epoch). It depends only on the data, seq_len
and the seed. Global step s takes stream indices [s*G, (s+1)*G), G = micro_batch * grad_accum * world_size; rank r
takes the contiguous R = micro_batch * grad_accum of them starting at s*G + r*R, and micro-step k the k-th block of
micro_batch. The loader's state is `consumed_windows`, a position in the global stream, so a run resumed at another
world size (another G) continues exactly where the stream stopped.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smollm2.errors import DataError
from smollm2.manifest import INCOMPLETE_MARKER, MANIFEST_NAME, read_manifest
from smollm2.shards import open_shard, read_header, validate_shard

PREP_HINT = "run `make prep` (python -m data_prep --source shakespeare), or set data.path to a prepared directory"


class TokenStream:
    """Shards (memory-mapped) read as one concatenated sequence of tokens; with vocab_size, every id is checked on open."""

    def __init__(self, paths: list[Path], vocab_size: int | None = None):
        self.paths = paths
        self.shards = [open_shard(p, vocab_size) for p in paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # starts[i]: offset of shard i; [-1]: total

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, copied out of the shards (a read may span a shard boundary)."""
        assert 0 <= start and start + length <= len(self), (start, length, len(self))
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            offset = start + filled - int(self.starts[shard])
            take = min(length - filled, len(self.shards[shard]) - offset)
            out[filled : filled + take] = self.shards[shard][offset : offset + take]
            filled += take
            shard += 1
        return out


def windows_in(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len that fit in num_tokens."""
    return max(0, (num_tokens - 1) // seq_len)


class Dataset:
    """A prepared dataset directory: train_*.bin, val_*.bin and manifest.json (from data_prep), or an llm.c /
    modded-nanogpt directory of *train*.bin / *val*.bin without a manifest.

    Opening either kind scans every token id of every shard against the model's vocab (memory-mapped, in blocks):
    an id >= the vocab is one DataError naming the file, the id and its position, not an IndexError (or, on a GPU, a
    device-side assert that names no file) in the embedding hours later. No manifest vouches for an llm.c directory's
    ids; a manifest does (data_prep refuses such ids when it writes), but not for a shard damaged or replaced since, and
    the scan costs what reading the data once does: measured ~0.06 s per GB from the page cache, ~0.5-1.2 s per GB
    from disk (FineWeb 10B = 20 GB: ~1 s warm, 10-25 s cold; the ranks of a node share the page cache). Not cached: a
    cache keyed by size + mtime would save those seconds per start but trust a file that was rewritten in place."""

    def __init__(self, path: Path, train: TokenStream, val: TokenStream, manifest: dict | None, fingerprint: str):
        self.path, self.train, self.val, self.manifest, self.fingerprint = path, train, val, manifest, fingerprint

    @property
    def train_tokens(self) -> int:
        return len(self.train)

    @property
    def val_tokens(self) -> int:
        return len(self.val)

    @classmethod
    def open(cls, path: str | Path, vocab_size: int = 50258) -> Dataset:
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"no prepared dataset at {path}: {PREP_HINT}")
        manifest = read_manifest(path)  # None if absent; DataError if malformed or of another version
        if manifest is not None:
            return cls._open_manifest(path, manifest, vocab_size)
        if (path / INCOMPLETE_MARKER).exists():
            raise DataError(f"the data prep into {path} did not finish (interrupted?): re-run it; {PREP_HINT}")
        train_paths, val_paths = sorted(path.glob("*train*.bin")), sorted(path.glob("*val*.bin"))
        if not train_paths:
            raise DataError(f"{path} holds no {MANIFEST_NAME} and no *train*.bin shards: {PREP_HINT}")
        train, val = TokenStream(train_paths, vocab_size), TokenStream(val_paths, vocab_size)  # every id scanned
        listing = [(p.name, len(tokens)) for p, tokens in zip(train.paths, train.shards)]
        fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        return cls(path, train, val, None, fingerprint)

    @classmethod
    def _open_manifest(cls, path: Path, manifest: dict[str, Any], vocab_size: int) -> Dataset:
        """A directory with a (schema-checked) manifest: every listed shard must be there with its token count."""
        manifest_path = path / MANIFEST_NAME
        data_vocab, shards = manifest["tokenizer"]["vocab_size"], manifest["shards"]
        if data_vocab > vocab_size:
            raise DataError(f"{path} was tokenized with a {data_vocab}-token vocab, the model has {vocab_size}: "
                            f"re-prepare it with this project's GPT-2 tokenizer (python -m data_prep --out {path} ...)")
        split_paths: dict[str, list[Path]] = {"train": [], "val": []}
        for shard in shards:
            shard_path = path / shard["file"]
            if not shard_path.is_file():
                raise DataError(f"{shard_path} is listed in {manifest_path} but missing: {PREP_HINT}")
            if (count := read_header(shard_path)) != shard["tokens"]:
                raise DataError(
                    f"{shard_path} holds {count:,} tokens, the manifest says {shard['tokens']:,}: {PREP_HINT}"
                )
            split_paths[shard["split"]].append(shard_path)
        if not split_paths["train"]:
            raise DataError(f"{manifest_path} lists no train shards: {PREP_HINT}")
        train_listing = [(s["file"], s["tokens"], s["sha256"]) for s in shards if s["split"] == "train"]
        fingerprint = hashlib.sha256(json.dumps(train_listing).encode()).hexdigest()
        # The vocab check above trusts the manifest; the scan checks the files themselves (see the class docstring).
        train, val = TokenStream(split_paths["train"], vocab_size), TokenStream(split_paths["val"], vocab_size)
        return cls(path, train, val, manifest, fingerprint)

    def verify(self, vocab_size: int = 50258) -> None:
        """The slow, full check: every token id, and every sha256 the manifest lists."""
        listed = {s["file"]: s for s in (self.manifest or {}).get("shards", [])}
        for shard_path in self.train.paths + self.val.paths:
            entry = listed.get(shard_path.name)
            validate_shard(shard_path, vocab_size, entry and entry["sha256"], entry and entry["tokens"])

    def __repr__(self) -> str:
        return f"Dataset({self.path}, train_tokens={self.train_tokens:,}, val_tokens={self.val_tokens:,})"


class TrainLoader:
    """This rank's batches of the global window stream; `next_step()` returns grad_accum (inputs, targets) pairs."""

    def __init__(self, dataset: Dataset, seq_len: int, micro_batch: int, grad_accum: int, rank: int, world_size: int,
                 seed: int, device: torch.device | str = "cpu", prefetch: int = 2):
        if min(seq_len, micro_batch, grad_accum, world_size) < 1 or not 0 <= rank < world_size or prefetch < 0:
            raise DataError(f"bad loader shape: seq_len={seq_len} micro_batch={micro_batch} grad_accum={grad_accum} "
                            f"rank={rank} world_size={world_size} prefetch={prefetch}")
        self.dataset, self.seq_len, self.seed = dataset, seq_len, seed
        self.micro_batch, self.grad_accum, self.rank, self.world_size = micro_batch, grad_accum, rank, world_size
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.windows_per_epoch = windows_in(dataset.train_tokens, seq_len)
        if self.windows_per_epoch == 0:
            raise DataError(f"{dataset.path}: the train split has {dataset.train_tokens:,} tokens, fewer than one "
                            f"window of seq_len + 1 = {seq_len + 1}; use more data or a shorter data.seq_len")
        self.rank_windows_per_step = micro_batch * grad_accum  # R
        self.windows_per_step = self.rank_windows_per_step * world_size  # G
        self.consumed_windows = 0
        self._orders: dict[int, np.ndarray] = {}
        self._orders_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None  # what the prefetch thread raised, re-raised by every next_step()
        self._start_prefetch()

    # ------------------------------------------------------------------------------------------ the global order

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of window ids for `epoch` (the last two are cached)."""
        with self._orders_lock:
            if epoch not in self._orders:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                self._orders[epoch] = rng.permutation(self.windows_per_epoch)
                for old in sorted(self._orders)[:-2]:
                    del self._orders[old]
            return self._orders[epoch]

    def stream_windows(self, start: int, count: int) -> np.ndarray:
        """Window ids at global stream indices [start, start + count), across epoch boundaries."""
        n = self.windows_per_epoch
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(start + filled, n)
            take = min(count - filled, n - offset)
            out[filled : filled + take] = self.epoch_order(epoch)[offset : offset + take]
            filled += take
        return out

    def _rank_windows_from(self, step_start: int) -> np.ndarray:
        return self.stream_windows(step_start + self.rank * self.rank_windows_per_step, self.rank_windows_per_step)

    # ------------------------------------------------------------------------------------------ batches

    def _build_step(self, step_start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """CPU tensors (pinned when the target is CUDA) for the step whose global stream starts at step_start."""
        windows = self._rank_windows_from(step_start)
        span = self.seq_len + 1
        batches = []
        for k in range(self.grad_accum):
            block = windows[k * self.micro_batch : (k + 1) * self.micro_batch]
            tokens = np.stack([self.dataset.train.read(int(w) * self.seq_len, span) for w in block])
            inputs = torch.from_numpy(np.ascontiguousarray(tokens[:, :-1]))
            targets = torch.from_numpy(np.ascontiguousarray(tokens[:, 1:]))
            if self.device.type == "cuda":
                inputs, targets = inputs.pin_memory(), targets.pin_memory()
            batches.append((inputs, targets))
        return batches

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """grad_accum (inputs, targets) pairs, each int64 [micro_batch, seq_len] on the device, for the step at
        consumed_windows; advances consumed_windows by G."""
        if self._thread is None:
            batches = self._build_step(self.consumed_windows)
        else:
            step_start, batches = self._take_prefetched()
            assert step_start == self.consumed_windows, (step_start, self.consumed_windows)
        self.consumed_windows += self.windows_per_step
        non_blocking = self.device.type == "cuda"
        return [(x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking))
                for x, y in batches]

    # ------------------------------------------------------------------------------------------ prefetch

    def _start_prefetch(self) -> None:
        if self.prefetch == 0:
            return
        self._failure = None
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        args = (self.consumed_windows, self._stop, self._queue)
        self._thread = threading.Thread(target=self._prefetch_loop, args=args, name="loader-prefetch", daemon=True)
        self._thread.start()

    def _take_prefetched(self) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The next step from the prefetch thread. Raises what the thread raised (in this, the caller's, thread), then
        again on every later call; never waits on a thread that has exited."""
        if self._failure is not None:
            raise self._failure
        assert self._thread is not None
        while True:
            try:
                step_start, batches = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                # liveness first: a thread that has exited has queued all it ever will, so its last item is not missed
                if not self._thread.is_alive() and self._queue.empty():
                    self._failure = RuntimeError("the loader's prefetch thread exited without a result")
                    raise self._failure from None
        if isinstance(batches, BaseException):
            self._failure = batches
            raise batches
        return step_start, batches

    def _prefetch_loop(self, step_start: int, stop: threading.Event, out: queue.Queue) -> None:
        """Build steps in stream order from step_start; next_step() takes them in the same order."""
        while not stop.is_set():
            try:
                item: tuple[int, Any] = (step_start, self._build_step(step_start))
            except BaseException as err:  # noqa: BLE001 - handed to next_step(), which raises it
                item = (step_start, err)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            step_start += self.windows_per_step

    def _stop_prefetch(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def close(self) -> None:
        self._stop_prefetch()

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed_windows": self.consumed_windows,
            "epoch": self.consumed_windows // self.windows_per_epoch,  # derived; for people reading checkpoints
            "seq_len": self.seq_len,
            "seed": self.seed,
            "windows_per_epoch": self.windows_per_epoch,
            "data_fingerprint": self.dataset.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the global stream at state["consumed_windows"]; any world size, micro_batch or grad_accum."""
        for key, ours in [("seq_len", self.seq_len), ("seed", self.seed), ("windows_per_epoch", self.windows_per_epoch),
                          ("data_fingerprint", self.dataset.fingerprint)]:
            if key not in state:
                raise DataError(f"loader state has no '{key}': not a TrainLoader state")
            if state[key] != ours:
                raise DataError(f"the checkpoint's loader state has {key}={state[key]!r}, this run has {ours!r}: "
                                "resume with the same data, data.seq_len and data.seed (or start a new run)")
        consumed = int(state["consumed_windows"])
        if consumed < 0:
            raise DataError(f"loader state has consumed_windows={consumed}")
        self._stop_prefetch()
        self.consumed_windows = consumed
        self._start_prefetch()


class ValWindows:
    """The fixed val set: the first num_windows windows of the val split, in order, the same at any world size."""

    def __init__(self, dataset: Dataset, seq_len: int, num_windows: int):
        available = windows_in(dataset.val_tokens, seq_len)
        self.num_windows = min(num_windows, available)
        if self.num_windows == 0:
            raise DataError(f"{dataset.path}: the val split has {dataset.val_tokens:,} tokens, fewer than one window "
                            f"of seq_len + 1 = {seq_len + 1}; prep with a larger --val-fraction / --val-tokens")
        tokens = dataset.val.read(0, self.num_windows * seq_len + 1)
        starts = np.arange(self.num_windows) * seq_len
        self.windows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]))

    def rank_windows(self, rank: int, world_size: int) -> torch.Tensor:
        """int64 [n_r, seq_len + 1]: windows rank, rank + world_size, ... ."""
        return self.windows[rank::world_size]

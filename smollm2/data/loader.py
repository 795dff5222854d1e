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

import queue
import threading
from typing import Any

import numpy as np
import torch

from smollm2.data.dataset import Dataset
from smollm2.errors import DataError


def windows_in(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len that fit in num_tokens."""
    return max(0, (num_tokens - 1) // seq_len)


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
        # The prefetch thread starts with the first next_step(), at the position training starts from: none runs while
        # a run is still being set up (a setup that fails leaves no thread behind to race the process's exit).
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None  # what the prefetch thread raised, re-raised by every next_step()

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
        if self._thread is None and self.prefetch > 0:
            self._start_prefetch()
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

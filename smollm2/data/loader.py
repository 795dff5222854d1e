"""Training windows of the global stream (smollm2/data/order.py), sliced per rank, as batches.

Window i of a dataset is tokens [i*T, i*T + T + 1) of its train split read as one stream, T = seq_len: the stride is T,
so consecutive windows share one token and every token is a target exactly once per epoch. Global step s takes the
next G = micro_batch * grad_accum * world_size windows of the global stream; rank r takes the contiguous R =
micro_batch * grad_accum of them starting at r*R, and micro-step k the k-th block of micro_batch. The loader's state is
the stream's cursor (a position in the global stream, and a mixture's per-source counts), so a run resumed at another
world size (another G) continues exactly where the stream stopped.

With document masking (`eos_id` set), each micro-batch whose windows hold more than one document also carries
`doc_ids` [B, T] (the document of each input position: EOS ends a document) and, with `position_reset`, `positions`
[B, T] (each document's RoPE positions from 0); a micro-batch of single-document windows carries neither.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
import torch

from smollm2.data.dataset import Dataset
from smollm2.data.order import Cursor, Plan, SourceStream, WindowOrder, windows_in
from smollm2.errors import DataError

__all__ = ["TrainLoader", "ValWindows", "document_ids", "documents_of", "windows_in"]


def document_ids(inputs: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(doc_ids, positions) of input windows [B, T]: a document ends with its EOS; None if no row holds two documents."""
    ends = inputs[:, :-1] == eos_id
    if not ends.any():
        return None
    doc_ids = np.zeros(inputs.shape, dtype=np.int64)
    np.cumsum(ends, axis=1, out=doc_ids[:, 1:])
    index = np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape)
    starts = np.where(np.diff(doc_ids, axis=1, prepend=0) > 0, index, 0)  # each document's first position
    return doc_ids, index - np.maximum.accumulate(starts, axis=1)


def documents_of(inputs: np.ndarray, eos_id: int | None, position_reset: bool) -> dict[str, torch.Tensor]:
    """What a masked micro-batch carries for its input windows [B, T] (CPU tensors): `doc_ids`, and with
    `position_reset` the reset `positions`; {} without masking (`eos_id` None) or when each window is one document."""
    found = None if eos_id is None else document_ids(inputs, eos_id)
    if found is None:
        return {}
    names = ("doc_ids", "positions") if position_reset else ("doc_ids",)
    return {name: torch.from_numpy(a) for name, a in zip(names, found)}


class TrainLoader:
    """This rank's batches of the global window stream; `next_step()` returns grad_accum micro-batches.

    `data`: a Dataset (the one-dataset order) or a WindowOrder (a mixture)."""

    def __init__(self, data: Dataset | WindowOrder, seq_len: int, micro_batch: int, grad_accum: int, rank: int,
                 world_size: int, seed: int, device: torch.device | str = "cpu", prefetch: int = 2,
                 eos_id: int | None = None, position_reset: bool = True):
        if min(seq_len, micro_batch, grad_accum, world_size) < 1 or not 0 <= rank < world_size or prefetch < 0:
            raise DataError(f"bad loader shape: seq_len={seq_len} micro_batch={micro_batch} grad_accum={grad_accum} "
                            f"rank={rank} world_size={world_size} prefetch={prefetch}")
        self.order = data if isinstance(data, WindowOrder) else WindowOrder([SourceStream("data", data, seq_len, seed)])
        self.dataset = self.order.sources[0].dataset
        self.seq_len, self.seed, self.eos_id, self.position_reset = seq_len, seed, eos_id, position_reset
        self.micro_batch, self.grad_accum, self.rank, self.world_size = micro_batch, grad_accum, rank, world_size
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.windows_per_epoch = self.order.sources[0].windows_per_epoch
        self.rank_windows_per_step = micro_batch * grad_accum  # R
        self.windows_per_step = self.rank_windows_per_step * world_size  # G
        self.cursor: Cursor = self.order.start()
        self.changed: list[str] = []  # what differs from the checkpoint's mixture (set by load_state_dict)
        self._events: list[str] = []  # epochs started in the steps taken, until take_news()
        self._drawn = [0] * len(self.order.sources)  # windows per source in the steps taken, until take_news()
        # The prefetch thread starts with the first next_step(), at the position training starts from: none runs while
        # a run is still being set up (a setup that fails leaves no thread behind to race the process's exit).
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None  # what the prefetch thread raised, re-raised by every next_step()

    @property
    def consumed_windows(self) -> int:
        return self.cursor.position

    def stream_windows(self, start: int, count: int) -> np.ndarray:
        """The one-dataset order's window ids at global stream indices [start, start + count)."""
        return self.order.sources[0].windows(start, count)

    def take_news(self) -> tuple[list[str], dict[str, int]]:
        """What happened since the last call: the epochs sources started, and the windows each source gave."""
        events, drawn = self._events, dict(zip(self.order.names, self._drawn))
        self._events, self._drawn = [], [0] * len(self._drawn)
        return events, drawn

    # ------------------------------------------------------------------------------------------ batches

    def _build_step(self, cursor: Cursor) -> tuple[Plan, list[tuple]]:
        """The plan and CPU tensors (pinned when the target is CUDA) of the step at `cursor`."""
        plan = self.order.plan(cursor, self.windows_per_step, self.rank * self.rank_windows_per_step,
                               self.rank_windows_per_step)
        span, streams = self.seq_len + 1, self.order.sources
        batches = []
        for k in range(self.grad_accum):
            block = slice(k * self.micro_batch, (k + 1) * self.micro_batch)
            tokens = np.stack([streams[s].dataset.train.read(int(w) * self.seq_len, span)
                               for s, w in zip(plan.sources[block], plan.windows[block])])
            tensors = [torch.from_numpy(np.ascontiguousarray(p)) for p in (tokens[:, :-1], tokens[:, 1:])]
            tensors += documents_of(tokens[:, :-1], self.eos_id, self.position_reset).values()
            if self.device.type == "cuda":
                tensors = [t.pin_memory() for t in tensors]
            batches.append(tuple(tensors))
        return plan, batches

    def next_step(self) -> list[tuple]:
        """grad_accum micro-batches, each (inputs, targets) int64 [micro_batch, seq_len] on the device, and with document
        masking on a multi-document micro-batch (inputs, targets, {"doc_ids": ..., "positions": ...}); advances the
        cursor by one step of G windows."""
        if self._thread is None and self.prefetch > 0:
            self._start_prefetch()
        if self._thread is None:
            plan, batches = self._build_step(self.cursor)
        else:
            cursor, plan, batches = self._take_prefetched()
            assert cursor == self.cursor, (cursor, self.cursor)
        self.cursor = plan.after
        self._events += plan.events
        self._drawn = [a + b for a, b in zip(self._drawn, plan.drawn)]
        non_blocking = self.device.type == "cuda"
        out = []
        for tensors in batches:
            x, y, *docs = (t.to(self.device, non_blocking=non_blocking) for t in tensors)
            out.append((x, y, dict(zip(("doc_ids", "positions"), docs))) if docs else (x, y))
        return out

    # ------------------------------------------------------------------------------------------ prefetch

    def _start_prefetch(self) -> None:
        if self.prefetch == 0:
            return
        self._failure = None
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        args = (self.cursor, self._stop, self._queue)
        self._thread = threading.Thread(target=self._prefetch_loop, args=args, name="loader-prefetch", daemon=True)
        self._thread.start()

    def _take_prefetched(self) -> tuple[Cursor, Plan, list[tuple]]:
        """The next step from the prefetch thread. Raises what the thread raised (in this, the caller's, thread), then
        again on every later call; never waits on a thread that has exited."""
        if self._failure is not None:
            raise self._failure
        assert self._thread is not None
        while True:
            try:
                cursor, result = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                # liveness first: a thread that has exited has queued all it ever will, so its last item is not missed
                if not self._thread.is_alive() and self._queue.empty():
                    self._failure = RuntimeError("the loader's prefetch thread exited without a result")
                    raise self._failure from None
        if isinstance(result, BaseException):
            self._failure = result
            raise result
        return cursor, *result

    def _prefetch_loop(self, cursor: Cursor, stop: threading.Event, out: queue.Queue) -> None:
        """Build steps in stream order from `cursor`; next_step() takes them in the same order."""
        while not stop.is_set():
            try:
                item: tuple[Cursor, Any] = (cursor, self._build_step(cursor))
            except BaseException as err:  # noqa: BLE001 - handed to next_step(), which raises it
                item = (cursor, err)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return
            cursor = item[1][0].after

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
        return self.order.state_dict(self.cursor)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the global stream where `state` stands; any world size, micro_batch or grad_accum."""
        cursor, self.changed = self.order.load_state_dict(state)
        self._stop_prefetch()
        self.cursor = cursor


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

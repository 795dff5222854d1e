"""The global order of training windows: which window of which dataset each position of the global stream holds.

One dataset (data.path): stream position g is window `order(g // N)[g % N]`, N = windows per epoch, order(epoch) a
permutation of range(N) drawn from PCG64 seeded by (seed, epoch). The cursor is g, the windows consumed.

A mixture (data.mixture / data.stages): each source is its own epoch stream (a permutation per epoch seeded by (seed, a
key of the source's name, epoch)), repeating with a new shuffle when it is exhausted. Which source position g draws from
is decided inside the stage that holds it: position p of the stage goes to the source with the largest deficit
`w_i * (p + 1) - drawn_i` (weights normalized, drawn_i its windows so far in the stage; ties to the first name in
alphabetical order, so the order the sources are listed in does not matter), so every source's count stays within about one window of its share at every point and within two over
any span (docs/data.md, "Mixtures"): over 100 steps of G >= 2 windows, within 1% of its weight. A stage starts at the first step at or after its start_step. The cursor holds the position, the steps taken, the stage and each
source's counts; the choice depends on those alone, never on the world size, micro-batch or accumulation, so a run
resumed at another world size continues the same sequence (at the same global batch, stage boundaries fall at the same
positions too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from smollm2.data.dataset import Dataset
from smollm2.errors import DataError


def windows_in(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len that fit in num_tokens."""
    return max(0, (num_tokens - 1) // seq_len)


class SourceStream:
    """One dataset's windows as an endless stream of shuffled epochs. `key` None: the one-dataset order (seed, epoch)."""

    def __init__(self, name: str, dataset: Dataset, seq_len: int, seed: int, key: int | None = None):
        self.name, self.dataset, self.seq_len, self.seed, self.key = name, dataset, seq_len, seed, key
        self.windows_per_epoch = windows_in(dataset.train_tokens, seq_len)
        if self.windows_per_epoch == 0:
            raise DataError(f"{dataset.path}: the train split has {dataset.train_tokens:,} tokens, fewer than one "
                            f"window of seq_len + 1 = {seq_len + 1}; use more data or a shorter data.seq_len")
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the prefetch thread and the caller's thread both read orders

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of window ids for `epoch` (the last two are cached)."""
        with self._lock:
            if epoch not in self._orders:
                seed = [self.seed, epoch] if self.key is None else [self.seed, self.key, epoch]
                self._orders[epoch] = np.random.Generator(np.random.PCG64(seed)).permutation(self.windows_per_epoch)
                for old in sorted(self._orders)[:-2]:
                    del self._orders[old]
            return self._orders[epoch]

    def windows(self, start: int, count: int) -> np.ndarray:
        """Window ids at this source's stream positions [start, start + count), across epoch boundaries."""
        n = self.windows_per_epoch
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, offset = divmod(start + filled, n)
            take = min(count - filled, n - offset)
            out[filled : filled + take] = self.epoch_order(epoch)[offset : offset + take]
            filled += take
        return out

    def epochs_started(self, before: int, after: int) -> list[int]:
        """The epochs (>= 1) whose first window lies in this source's positions [before, after)."""
        n = self.windows_per_epoch
        return list(range(max(1, -(-before // n)), -(-after // n)))


def source_key(name: str) -> int:
    """A mixture source's seed key: from its name, so a source keeps its order when others are added or reordered."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


@dataclass(frozen=True)
class Stage:
    start_step: int
    weights: tuple[float, ...]  # normalized, one per source of the mixture (0: not drawn in this stage)


@dataclass(frozen=True)
class Cursor:
    """Where the stream stands after `step` loader steps. Immutable: the prefetch thread plans ahead on its own copy."""

    position: int = 0  # windows of the global stream consumed
    step: int = 0
    stage: int = 0
    stage_start: int = 0  # the position the stage began at
    stage_counts: tuple[int, ...] = ()  # per source: windows drawn in this stage
    consumed: tuple[int, ...] = ()  # per source: windows drawn in all


@dataclass
class Plan:
    """One step of the global stream: this rank's (source, window) pairs, the cursor after it, what to announce."""

    sources: np.ndarray
    windows: np.ndarray
    after: Cursor
    drawn: tuple[int, ...]  # per source: windows the whole step (every rank) drew
    events: list[str]


class WindowOrder:
    """The global (source, window) sequence over `sources` (one SourceStream: the one-dataset order) and `stages`."""

    def __init__(self, sources: list[SourceStream], stages: list[Stage] | None = None):
        self.sources = sources
        self.stages = stages or [Stage(0, (1.0,))]
        self.mixed = len(sources) > 1 or sources[0].key is not None

    def start(self) -> Cursor:
        zeros = (0,) * len(self.sources)
        return Cursor(stage_counts=zeros, consumed=zeros)

    def stage_at(self, step: int) -> int:
        return max(k for k, stage in enumerate(self.stages) if stage.start_step <= step)

    def plan(self, cursor: Cursor, step_windows: int, rank_start: int, rank_windows: int) -> Plan:
        """The step at `cursor`: `step_windows` windows of the global stream, this rank's [rank_start, + rank_windows)."""
        if not self.mixed:  # the one-dataset order: positions map straight to windows
            source = self.sources[0]
            windows = source.windows(cursor.position + rank_start, rank_windows)
            after = cursor.position + step_windows
            drawn = (step_windows,)
            events = [self._epoch_event(source, e) for e in source.epochs_started(cursor.position, after)]
            return Plan(np.zeros(rank_windows, dtype=np.int64), windows, self._advance(cursor, drawn), drawn, events)
        cursor = self._enter_stage(cursor)
        choice = self._choose(cursor, step_windows)
        sources, windows = np.empty(step_windows, dtype=np.int64), np.empty(step_windows, dtype=np.int64)
        events, drawn = [], []
        for i, source in enumerate(self.sources):
            at = np.flatnonzero(choice == i)
            drawn.append(len(at))
            sources[at] = i
            windows[at] = source.windows(cursor.consumed[i], len(at))
            before = cursor.consumed[i]
            events += [self._epoch_event(source, e) for e in source.epochs_started(before, before + len(at))]
        mine = slice(rank_start, rank_start + rank_windows)
        return Plan(sources[mine], windows[mine], self._advance(cursor, tuple(drawn)), tuple(drawn), events)

    def _enter_stage(self, cursor: Cursor) -> Cursor:
        stage = self.stage_at(cursor.step)
        if stage == cursor.stage:
            return cursor
        return dataclasses.replace(cursor, stage=stage, stage_start=cursor.position,
                                   stage_counts=(0,) * len(self.sources))

    def _choose(self, cursor: Cursor, count: int) -> np.ndarray:
        """The source of each of the next `count` positions of the stage: the largest deficit (see the module docstring)."""
        weights = self.stages[cursor.stage].weights
        drawn = list(cursor.stage_counts)
        live = [i for i, w in enumerate(weights) if w > 0]
        first = {i: -rank for rank, i in enumerate(sorted(live, key=lambda i: self.sources[i].name))}  # ties: by name
        p = cursor.position - cursor.stage_start
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            p += 1
            best = max(live, key=lambda i: (weights[i] * p - drawn[i], first[i]))
            drawn[best] += 1
            out[j] = best
        return out

    @staticmethod
    def _advance(before: Cursor, drawn: tuple[int, ...]) -> Cursor:
        return dataclasses.replace(
            before, position=before.position + sum(drawn), step=before.step + 1,
            stage_counts=tuple(a + b for a, b in zip(before.stage_counts, drawn)),
            consumed=tuple(a + b for a, b in zip(before.consumed, drawn)))

    def _epoch_event(self, source: SourceStream, epoch: int) -> str:
        what = f"source '{source.name}'" if self.mixed else "the dataset"
        return f"data: {what} started epoch {epoch} (a new shuffle of its {source.windows_per_epoch:,} windows)"

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self, cursor: Cursor) -> dict[str, Any]:
        first = self.sources[0]
        if not self.mixed:  # the one-dataset layout of every checkpoint before mixtures
            return {"consumed_windows": cursor.position, "epoch": cursor.position // first.windows_per_epoch,
                    "seq_len": first.seq_len, "seed": first.seed, "windows_per_epoch": first.windows_per_epoch,
                    "data_fingerprint": first.dataset.fingerprint}
        return {
            "consumed_windows": cursor.position, "steps": cursor.step, "seq_len": first.seq_len, "seed": first.seed,
            "stage": cursor.stage, "stage_start_windows": cursor.stage_start,
            "stages": self._stage_dicts(),
            "sources": {s.name: {"consumed_windows": cursor.consumed[i], "epoch": cursor.consumed[i] // s.windows_per_epoch,
                                 "stage_windows": cursor.stage_counts[i], "windows_per_epoch": s.windows_per_epoch,
                                 "data_fingerprint": s.dataset.fingerprint, "path": str(s.dataset.path)}
                        for i, s in enumerate(self.sources)},
        }

    def _stage_dicts(self) -> list[dict[str, Any]]:
        """The stages as a checkpoint records them (weights by source name), to compare with the ones it recorded."""
        return [{"start_step": s.start_step, "weights": dict(zip(self.names, s.weights))} for s in self.stages]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def load_state_dict(self, state: dict[str, Any]) -> tuple[Cursor, list[str]]:
        """The cursor a checkpoint's loader state stands at, and warnings (a mixture that changed since)."""
        first = self.sources[0]
        ours = {"seq_len": first.seq_len, "seed": first.seed}
        if not self.mixed:
            ours.update(windows_per_epoch=first.windows_per_epoch, data_fingerprint=first.dataset.fingerprint)
        if self.mixed != ("sources" in state):
            had = "a mixture of " + ", ".join(state["sources"]) if "sources" in state else "one dataset (data.path)"
            raise DataError(f"the checkpoint's run drew from {had}; this run from "
                            f"{'a mixture' if self.mixed else 'one dataset'}: resume with the data it was trained on")
        _check_same(state, ours)
        position = int(state["consumed_windows"])
        if position < 0:
            raise DataError(f"loader state has consumed_windows={position}")
        if not self.mixed:
            return Cursor(position=position, stage_counts=(0,), consumed=(position,)), []
        return self._load_mixture(state, position)

    def _load_mixture(self, state: dict[str, Any], position: int) -> tuple[Cursor, list[str]]:
        saved, warnings = state["sources"], []
        for s in self.sources:
            if s.name in saved:
                _check_same(saved[s.name], {"windows_per_epoch": s.windows_per_epoch,
                                            "data_fingerprint": s.dataset.fingerprint}, f"source '{s.name}': ")
            else:
                warnings.append(f"source '{s.name}' is new: it starts at its first window")
        if gone := sorted(set(saved) - set(self.names)):
            warnings.append(f"the checkpoint's sources {', '.join(gone)} are no longer drawn")
        consumed = tuple(int(saved.get(name, {}).get("consumed_windows", 0)) for name in self.names)
        stages = self._stage_dicts()
        step = int(state["steps"])
        current = self.stage_at(max(step - 1, 0))  # the stage of the last step taken, as the checkpoint's "stage" is
        if stages[current] == state["stages"][int(state["stage"])] and not warnings:  # exactly where it stood
            if stages != state["stages"]:
                warnings.append("the stages after this one differ from the checkpoint's: they apply when reached")
            counts = tuple(int(saved[name]["stage_windows"]) for name in self.names)
            return Cursor(position, step, current, int(state["stage_start_windows"]), counts, consumed), warnings
        warnings.append(f"the mixture differs from the checkpoint's: from step {step} on, it draws by this run's "
                        "weights")
        # a new stretch of the stage starts here: its shares count from this position
        cursor = Cursor(position, step, self.stage_at(step), position, (0,) * len(self.sources), consumed)
        return cursor, warnings


def _check_same(state: dict[str, Any], ours: dict[str, Any], what: str = "") -> None:
    for key, value in ours.items():
        if key not in state:
            raise DataError(f"loader state has no '{key}': not a TrainLoader state")
        if state[key] != value:
            raise DataError(f"the checkpoint's loader state has {what}{key}={state[key]!r}, this run has {value!r}: "
                            "resume with the same data, data.seq_len and data.seed (or start a new run)")

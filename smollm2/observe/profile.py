"""Traces and memory snapshots on demand: `train.profile_steps=[START, END]` and `train.memory_snapshot=STEP`.

A `torch.profiler` trace of optimizer steps START..END (inclusive), one per rank, into
`<run_dir>/profile/rank-NNNNN/trace-steps-START-END.json.gz` (Chrome trace JSON, gzip: Perfetto and chrome://tracing open
it as it is), and on rank 0 one line naming the ops that took the most time. A CUDA memory snapshot
(`torch.cuda.memory._record_memory_history` from the run's first step, dumped after STEP) into
`<run_dir>/profile/rank-NNNNN/memory-step-STEP.pickle` (open it at pytorch.org/memory_viz). Neither is built when its key
is unset: `make_profiler` returns None and the loop does nothing for it.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch


class StepProfiler:
    """Called around every step by the loop (only when configured): `begin(step)` before it, `end(step)` after it."""

    def __init__(self, run_dir: Path, rank: int, device: torch.device, steps: list[int], memory_step: int | None):
        self.dir = Path(run_dir) / "profile" / f"rank-{rank:05d}"
        self.rank, self.device = rank, device
        self.start, self.stop = (steps[0], steps[1]) if steps else (None, None)
        self.memory_step = memory_step if device.type == "cuda" else None
        self._profiler: torch.profiler.profile | None = None
        self._first, self._done = 0, False  # the first step traced; whether the trace is written
        self._recording = False  # CUDA allocations, from the first step on (not past the snapshot's step: a resume)
        self.lines: list[str] = []  # for rank 0's log
        if memory_step is not None and device.type != "cuda":
            self.lines.append(f"train.memory_snapshot={memory_step}: a CUDA memory snapshot; skipped on {device.type}")

    def begin(self, step: int) -> None:
        """At START (or the first step after it: a run resumed inside the range traces what is left of it)."""
        if self.memory_step is not None and not self._recording and step <= self.memory_step:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            self._recording = True
        if self.start is not None and self.start <= step <= self.stop and self._profiler is None and not self._done:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
            self._first = step

    def end(self, step: int, last: bool = False) -> None:
        """After END, or after the run's last step when it ends inside the range."""
        if self._profiler is not None and (step == self.stop or last):
            self._profiler.stop()
            self._write_trace(step)
            self._profiler, self._done = None, True
        if step == self.memory_step and self._recording:
            self._recording = False
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"memory-step-{step:06d}.pickle"
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.lines.append(f"memory snapshot after step {step}: {path} (open it at https://pytorch.org/memory_viz)")

    def _write_trace(self, last: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        plain = self.dir / f"trace-steps-{self._first:06d}-{last:06d}.json"
        assert self._profiler is not None
        self._profiler.export_chrome_trace(str(plain))
        with open(plain, "rb") as src, gzip.open(plain.with_suffix(".json.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        plain.unlink()
        self.lines.append(f"profile of steps {self._first}-{last}: {self.dir.parent}/rank-*/{plain.name}.gz "
                          f"(open in https://ui.perfetto.dev); {top_ops(self._profiler, self.device)}")

    def close(self, step: int) -> None:
        """The run ends (a stop request, an error): a trace in progress is written up to `step`, recording ends."""
        if self._profiler is not None:
            self.end(step, last=True)
        if self._recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording = False

    def take_lines(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def top_ops(profiler: torch.profiler.profile, device: torch.device, count: int = 5) -> str:
    """The ops with the most self time (the device's on CUDA, the host's otherwise), as shares of their sum."""
    events = [e for e in profiler.key_averages() if not e.key.startswith("ProfilerStep")]
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    timed = sorted(((getattr(e, attribute, 0) or 0, e.key) for e in events), reverse=True)
    total = sum(t for t, _ in timed) or 1
    where = "device" if device.type == "cuda" else "host"
    return f"top ops by {where} self time: " + ", ".join(f"{key} {t / total:.0%}" for t, key in timed[:count])


def make_profiler(run_dir: Path, rank: int, device: torch.device, steps: list[int],
                  memory_step: int | None) -> StepProfiler | None:
    """The run's profiler, or None when neither key is set (nothing is created, nothing runs per step)."""
    if not steps and memory_step is None:
        return None
    return StepProfiler(run_dir, rank, device, steps, memory_step)

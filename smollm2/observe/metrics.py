"""Throughput, MFU, memory; one record per log step to every sink (console, JSONL, WandB).

A sink is anything with `log(kind, record)` and `close()`; kinds are "train", "eval", "sample", "event" (a resume, a
checkpoint) and "histogram" (WandB only). Only rank 0 logs; the WandB sink is in tracking.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak per device, TFLOP/s (vendor figures, no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def device_peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_TFLOPS.items():
            if key in name:
                return peak
    return None


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights + 12*L*H*Q*T for attention (the PaLM / nanoGPT estimate). N is
    `SmolLM.flops_params()`: grouped-query attention and SwiGLU change the FLOPs through it (smaller K/V projections,
    three MLP matrices); the attention term counts query heads (each attends over its shared key/value head)."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory in GiB: CUDA, allocated since the last `reset_peak_memory_stats`; CPU, the process's peak RSS so far
    (no reset: it only grows over the process's life, e.g. across bench cases). Training logs and `bench.step` use it."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except ImportError:
        return float("nan")


def _host_rss_gib() -> float:
    """This process's resident memory now (Linux /proc; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return float("nan")


_NVML: Any = None


def _nvml_handle(device: torch.device):
    """pynvml's handle for this GPU, or None (pynvml not installed, no driver): utilization and power are optional."""
    global _NVML
    if _NVML is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _NVML = pynvml
        except Exception:  # noqa: BLE001 - any failure just means no GPU utilization numbers
            _NVML = False
    if not _NVML:
        return None
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _NVML.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001
        return None


def resources(device: torch.device) -> dict[str, float]:
    """Memory and device load for a log record: on CUDA, current / peak allocated and reserved memory, and (with pynvml)
    utilization and power; everywhere, host RSS now and peak. Peaks are since the process started."""
    out = {"host_rss_gib": _host_rss_gib(), "host_peak_rss_gib": peak_memory_gib(torch.device("cpu"))}
    if device.type != "cuda":
        return out
    out.update(mem_alloc_gib=torch.cuda.memory_allocated(device) / 2**30,
               mem_reserved_gib=torch.cuda.memory_reserved(device) / 2**30,
               peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
    handle = _nvml_handle(device)
    if handle is not None:
        try:
            out["gpu_util_pct"] = float(_NVML.nvmlDeviceGetUtilizationRates(handle).gpu)
            out["gpu_power_w"] = _NVML.nvmlDeviceGetPowerUsage(handle) / 1000.0
        except Exception:  # noqa: BLE001
            pass
    return out


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ConsoleSink:
    def __init__(self, stream=None):
        self.stream = stream  # None: sys.stdout at each line (the rank log tees it)

    def log(self, kind: str, r: dict[str, Any]) -> None:
        if kind == "train":
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            wait = f" (data {r['data_wait_ms']:.0f} ms)" if "data_wait_ms" in r else ""  # input-bound: near ms/step
            line = (f"step {r['step']:>6}/{r['max_steps']} | loss {r['loss']:.4f} | lr {r['lr']:.3e} | "
                    f"grad norm {r['grad_norm']:.3f} | {r['tok_per_s']:,.0f} tok/s | MFU {mfu} | "
                    f"mem {r['peak_mem_gib']:.2f} GiB | {r['step_ms']:.0f} ms/step{wait} | "
                    f"ETA {_fmt_duration(r['eta_s'])}")
        elif kind == "eval":
            sources = "".join(f" | {k.split('/')[1]} {v:.4f}" for k, v in r.items() if k.endswith("/val_loss"))
            line = (f"eval step {r['step']:>6} | val loss {r['val_loss']:.4f} | val ppl {r['val_ppl']:.2f}{sources} | "
                    f"{r['windows']} windows")
        elif kind == "sample":
            line = f"sample step {r['step']:>6} | {r['prompt']!r} -> {r['text']!r}"
        else:  # events are announced by the trainer's own lines; histograms are for WandB
            return
        print(line, file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        pass


class JsonlSink:
    """metrics.jsonl, eval.jsonl, samples.jsonl, events.jsonl (restarts, checkpoints) in the run directory, appended:
    a resumed run continues the files (after a crash resume, steps that were re-run appear twice, in the order run)."""

    FILES = {"train": "metrics.jsonl", "eval": "eval.jsonl", "sample": "samples.jsonl", "event": "events.jsonl"}

    def __init__(self, run_dir: Path):
        self.files = {kind: open(run_dir / name, "a", buffering=1) for kind, name in self.FILES.items()}

    def log(self, kind: str, record: dict[str, Any]) -> None:
        if kind in self.files:
            self.files[kind].write(json.dumps(record) + "\n")

    def close(self) -> None:
        for f in self.files.values():
            f.close()


class Metrics:
    """Rank 0's logger (other ranks pass no sinks). `sinks` is the seam for more outputs (WandB)."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, kind: str, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(kind, record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class Throughput:
    """Wall time between log steps (the log step's host sync makes it honest on GPUs)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_tflops: float | None, world_size: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_tflops, self.world_size = peak_tflops, world_size
        self.reset()

    def reset(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def step(self) -> None:
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (eval, samples, checkpoints) does not count against the training throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - start

    def measure(self, remaining_steps: int) -> dict[str, float | None]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        step_s = elapsed / max(self.steps, 1)
        tok_per_s = self.tokens_per_step * self.steps / elapsed
        mfu = None
        if self.peak_tflops:
            mfu = tok_per_s * self.flops_per_token / (self.peak_tflops * 1e12 * self.world_size)
        self.reset()
        return {"tok_per_s": tok_per_s, "step_ms": 1000 * step_s, "mfu": mfu, "eta_s": remaining_steps * step_s}

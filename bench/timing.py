"""Timing for `python -m bench.step`: steps timed on their own or taking turns (CUDA events on GPUs, wall clock on CPU),
one step's op counts under `torch.profiler`, the matmul peak measured in the process, and the per-case SDPA backend."""

from __future__ import annotations

import gc
import statistics
import time
from contextlib import contextmanager

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Milliseconds of each timed step (after `warmup` untimed ones). CUDA events recorded around each step, read once at
    the end (the step itself never syncs with the host); wall clock on CPU."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    return times


def time_alternating(steps_fns: list, device: torch.device, warmup: int, steps: int) -> list[list[float]]:
    """Milliseconds of each timed step of each function, the functions taking turns step by step (A B A B ...), so a
    burst of load from another process lands on all of them alike; `warmup` untimed turns first."""
    for _ in range(warmup):
        for fn in steps_fns:
            fn()
    synchronize(device)
    if device.type == "cuda":
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
                  for _ in steps_fns]
        for i in range(steps):
            for fn, fn_events in zip(steps_fns, events):
                fn_events[i][0].record()
                fn()
                fn_events[i][1].record()
        torch.cuda.synchronize(device)
        return [[start.elapsed_time(end) for start, end in fn_events] for fn_events in events]
    times: list[list[float]] = [[] for _ in steps_fns]
    for _ in range(steps):
        for fn, fn_times in zip(steps_fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(1000 * (time.perf_counter() - start))
    return times


def count_ops(step, device: torch.device) -> dict:
    """One more step under `torch.profiler` (CPU activity): dispatched aten ops, all profiler events (aten ops, autograd
    nodes, compiled-graph calls, record_function ranges), the profiled CPU time (sum of self times) and wall time."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        synchronize(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    return {"aten_ops": sum(a.count for a in averages if a.key.startswith("aten::")),
            "profiler_events": sum(a.count for a in averages),
            "profiled_cpu_ms": sum(a.self_cpu_time_total for a in averages) / 1000, "profiled_wall_ms": 1000 * wall}


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's dense matmul throughput in this process (bf16 on GPUs): best of a few timed runs."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 5
    best = float("inf")
    for _ in range(3):
        times = time_steps(lambda: torch.mm(a, b), device, warmup=2, steps=reps)
        best = min(best, statistics.median(times))
    return 2 * n**3 / (best / 1000) / 1e12


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextmanager
def sdpa_backend(choice: str, device: torch.device):
    """Restrict SDPA to one backend for the case (global flags: read when a compiled graph is traced)."""
    if choice == "default" or device.type != "cuda":
        yield
        return
    b = torch.backends.cuda
    flags = {"flash": b.flash_sdp_enabled(), "efficient": b.mem_efficient_sdp_enabled(), "math": b.math_sdp_enabled(),
             "cudnn": b.cudnn_sdp_enabled()}
    setters = {"flash": b.enable_flash_sdp, "efficient": b.enable_mem_efficient_sdp, "math": b.enable_math_sdp,
               "cudnn": b.enable_cudnn_sdp}
    try:
        for name, setter in setters.items():
            setter(name == choice)
        yield
    finally:
        for name, setter in setters.items():
            setter(flags[name])

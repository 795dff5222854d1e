"""Run a function on several gloo ranks in new processes joined by a FileStore (no torchrun), for tests that need a
real process group but want to hand each rank its own arguments (e.g. a stale view of a directory on one rank only).

The group's timeout bounds every collective: a rank left waiting for another fails within `group_timeout_s` instead of
hanging, and the caller's deadline lies above it."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import signal
import time
import traceback
from pathlib import Path

import torch.distributed as dist

# Ranks fork from a server that imported torch and smollm2 once (its first use starts it), instead of each spawned rank
# importing them again: two seconds of every multirank test. Each rank is still a fresh process with a group of its own.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "smollm2.train"])


def _rank_main(rank: int, world_size: int, store: str, fn, args: tuple, group_timeout_s: float, results) -> None:
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store, world_size), rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=group_timeout_s))
        try:
            results.put((rank, "ok", fn(rank, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - handed back to the test: the message first, the traceback after it
        results.put((rank, type(err).__name__, f"{err}\n{traceback.format_exc()}"))


def run_ranks(fn, args_per_rank: list[tuple], tmp_path: Path, *, timeout: float = 90,
              group_timeout_s: float = 20) -> list[tuple[str, object]]:
    """fn(rank, *args_per_rank[rank]) on len(args_per_rank) ranks (fn must be a module-level function: it is pickled).
    Returns [(status, value)] by rank: ("ok", fn's result) or (the exception's class name, its message + traceback)."""
    world_size = len(args_per_rank)
    tmp_path.mkdir(parents=True, exist_ok=True)
    ctx = _CONTEXT
    results = ctx.Queue()
    store = str(tmp_path / f"store-{time.monotonic_ns()}")  # a FileStore file must be new for each group
    procs = [ctx.Process(target=_rank_main, args=(rank, world_size, store, fn, args_per_rank[rank], group_timeout_s,
                                                  results)) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    out: dict[int, tuple[str, object]] = {}
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            out[rank] = (status, value)
    except queue.Empty:
        missing = sorted(set(range(world_size)) - set(out))
        raise AssertionError(f"rank(s) {missing} did not finish in {timeout}s: {out}") from None
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return [out[rank] for rank in range(world_size)]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own: a process-group kill misses
    them), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """kill -9 `pid` and every process below it, at once: a crash of the node."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass

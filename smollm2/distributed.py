"""The process group and this rank's device (NCCL on CUDA, gloo on CPU); how ranks agree (rank 0 decides, every rank
raises the same error); the startup checks of where ranks run.

`python -m smollm2.train` alone runs as a one-rank process group, so the rest of the code never branches on
"distributed or not". How the model is sharded lives in smollm2/parallelize.py.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from smollm2.config import Device
from smollm2.errors import ConfigError, UserError, one_line

T = TypeVar("T")


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device index of a rank: its local rank modulo the GPUs it can see.

    torchrun (and srun without GPU binding) shows every rank all GPUs of its node: rank i takes cuda:i. SLURM with
    `--gpus-per-task=1` / `--gpu-bind` sets CUDA_VISIBLE_DEVICES per task, so each rank sees one GPU, cuda:0, and
    cuda:<local rank> does not exist. The modulo is right in both cases."""
    if device_count < 1:
        raise ValueError(f"no CUDA device visible (device_count={device_count})")
    return local_rank % device_count


def init_distributed(device_pref: Device | str = Device.auto, timeout_minutes: float = 30) -> DistEnv:
    """Join (or, for a plain `python -m`, create) the process group and pick this rank's device. `timeout_minutes`
    (train.dist_timeout_min) bounds joining the group and every collective after it: a rank left waiting for another
    fails with an error naming the operation instead of hanging."""
    # Not under torchrun: a process group of one, on an in-process store (nothing to listen on, no environment set).
    alone = "RANK" not in os.environ
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if alone and tasks > 1:  # `srun -n N python -m smollm2.train`: N processes that would each be rank 0 of one
        raise UserError(f"started by srun as task {os.environ.get('SLURM_PROCID', '?')} of {tasks} without torchrun: every "
                        "task would train alone as rank 0 and write the same checkpoints; launch with "
                        "`sbatch launch/slurm.sbatch` (one torchrun per node), or run torchrun under srun yourself")
    rank, world_size = (0, 1) if alone else (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    local_rank = 0 if alone else int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_pref == Device.cuda or (device_pref == Device.auto and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available; use train.device=cpu (or auto)")
        device = torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # gloo for the few CPU-side collectives (checkpoint planning, objects)
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if alone:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and world_size > 1:
            store = attempt_store(rank, timeout)
            dist.init_process_group(backend=backend, store=store.prefixed, rank=rank, world_size=world_size,
                                    timeout=timeout)
            dist.barrier()  # every rank has joined this attempt's group: rank 0 may stop proving it is alive
            store.close()
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return DistEnv(rank, world_size, local_rank, device)


# ------------------------------------------------------------------------------------------ restarts under torchrun
# torchrun (torch >= 2.5) hosts the ranks' store in its agent and keeps it across `--max-restarts` restarts, so the keys
# each attempt's process group writes (every rank's gloo/NCCL address) are still there when the next attempt starts.
# A rank of the new attempt that reads another's key before that rank rewrote it gets the dead attempt's address and
# waits for it: "Connection refused", or a silent hang until the group's timeout (seen: 35 minutes, no output, a
# restart that never trained). torchrun's own per-attempt counter (TORCHELASTIC_RESTART_COUNT) is not the same on every
# node (only the node whose worker failed counts a restart), so it cannot name the attempt either.
#
# What every rank of one attempt can agree on: rank 0 publishes a fresh random name under one key and, until every rank
# has joined, keeps a counter under that name ticking. Another rank takes the published name only once it has seen the
# counter move: a dead attempt's rank 0 ticks no more, so a stale name is never taken. The group's keys then live under
# that name, new for every attempt.

_ATTEMPT_KEY = "smollm2/attempt"
_TICK_S = 0.1


class _AttemptStore:
    def __init__(self, base, name: str, ticker: threading.Event | None):
        self.prefixed = dist.PrefixStore(f"smollm2/{name}/", base)
        self.name, self._stop = name, ticker

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()


def _tick(key: str, stop: threading.Event, timeout: datetime.timedelta) -> None:
    # A connection of its own: the main thread's client is blocked in the group's rendezvous meanwhile (a store get).
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    while not stop.is_set():
        with contextlib.suppress(Exception):  # the store going away ends the attempt anyway
            store.add(key, 1)
        stop.wait(_TICK_S)


def attempt_store(rank: int, timeout: datetime.timedelta, *, check_s: float = 1.0):
    """This attempt's store (see above): the agent's store under a name fresh for every attempt, agreed on by all ranks.
    Bounded: a rank that sees no live name within `timeout` raises an error saying what it waited for."""
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    if rank == 0:
        name = f"{secrets.token_hex(8)}-{socket.gethostname()}-{os.getpid()}"
        stop = threading.Event()
        base.add(f"{_ATTEMPT_KEY}/{name}/tick", 1)
        threading.Thread(target=_tick, args=(f"{_ATTEMPT_KEY}/{name}/tick", stop, timeout), name="attempt-tick",
                         daemon=True).start()
        base.set(_ATTEMPT_KEY, name)
        return _AttemptStore(base, name, stop)
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        name = base.get(_ATTEMPT_KEY).decode()  # waits (up to the timeout) for rank 0's first publication
        tick = f"{_ATTEMPT_KEY}/{name}/tick"
        before = base.add(tick, 0)
        time.sleep(check_s)
        if base.add(tick, 0) > before:
            return _AttemptStore(base, name, None)
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 of this attempt did not publish a live store name under "
                               f"'{_ATTEMPT_KEY}' at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within "
                               f"{timeout} (train.dist_timeout_min): is rank 0 running?")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- how ranks agree
# Whatever depends on what a shared directory holds (which checkpoint to resume from, whether a step is saved) is decided
# by rank 0 and broadcast: on a cluster the listings of one directory can differ between nodes for a while (NFS caches
# them). And an error any rank meets must reach every rank as the same one-line error: a rank that raised alone would
# leave the others waiting in their next collective until the timeout. These helpers are the one way to do both; without
# a process group (one process, e.g. generate) they just run the function.


def _world(group=None) -> tuple[int, int]:
    """(this rank, the group's size); (0, 1) without a process group."""
    return (dist.get_rank(group), dist.get_world_size(group)) if dist.is_initialized() else (0, 1)


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _shareable(err: BaseException) -> tuple[type | None, str]:
    """(a UserError's class, its message), or (None, "Type: first line") for any other error (a bug)."""
    return (type(err), str(err)) if isinstance(err, UserError) else (None, one_line(err))


def _raise_shared(kind: type | None, message: str, rank: int, own: BaseException | None) -> None:
    """The agreed error on this rank: a UserError as its class and message (so every rank's reads the same); any other as
    a RuntimeError naming the rank it happened on, caused by this rank's own exception where it had one. Marked `agreed`:
    every rank raises it at this same point (what may still run collectives afterwards, e.g. the end of a save)."""
    err = kind(message) if kind is not None else RuntimeError(f"rank {rank}: {message}")
    err.agreed = True  # type: ignore[attr-defined]
    raise err from own


def rank0_decides(decide: Callable[[], T], group=None) -> T:
    """Collective: rank 0 runs `decide`; every rank returns its result, or raises its error (see `_raise_shared`; rank 0
    re-raises its own exception, traceback included)."""
    rank, world = _world(group)
    result, failure, shared = None, None, (None, None)
    if rank == 0:
        try:
            result = decide()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001 - every rank must hear of it, or the others wait forever (DCP's
            failure, shared = err, _shareable(err)  # CheckpointException is a BaseException)
    if world > 1:
        box = [result, shared]
        dist.broadcast_object_list(box, src=0, group=group)
        result, shared = box
    kind, message = shared
    if message is None:
        return result  # type: ignore[return-value]
    barrier(group)  # every rank has the message before any of them raises (and tears the group down)
    if failure is not None:
        failure.agreed = True  # type: ignore[attr-defined]
        raise failure
    _raise_shared(kind, message, 0, None)
    raise AssertionError("unreachable")


def every_rank(work: Callable[[], T], cleanup: Callable[[], None] | None = None, group=None) -> list[T]:
    """Collective: every rank runs `work`; returns the results by rank. If it failed on any rank, rank 0 runs `cleanup`
    (every rank is past `work` by then) and every rank raises the lowest failing rank's error (see `_raise_shared`)."""
    rank, world = _world(group)
    result, failure, shared = None, None, (None, None)
    try:
        result = work()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001 - shared below, then raised on every rank (DCP's CheckpointException
        failure, shared = err, _shareable(err)  # is a BaseException)
    outcomes: list[Any] = [(result, shared)]
    if world > 1:
        outcomes = [None] * world
        dist.all_gather_object(outcomes, (result, shared), group=group)
    failed = [(r, kind, message) for r, (_, (kind, message)) in enumerate(outcomes) if message is not None]
    if not failed:
        return [value for value, _ in outcomes]
    if cleanup is not None and rank == 0:
        cleanup()
    barrier(group)
    first, kind, message = failed[0]
    _raise_shared(kind, message, first, failure)
    raise AssertionError("unreachable")


def any_rank(flag: bool, device: torch.device) -> bool:
    """Collective: whether `flag` is true on any rank (one small all-reduce on the device)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Collective, in place: `tensor` averaged over every rank. NCCL averages in the all-reduce; gloo has no AVG, so it
    sums and divides."""
    if tensor.device.type == "cuda":
        dist.all_reduce(tensor, op=dist.ReduceOp.AVG)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


# --------------------------------------------------------------------------------------------------- startup checks


def _pci_bus_id(device: torch.device) -> str:
    """The GPU's PCI address as `nvidia-smi --query-gpu=pci.bus_id` prints it, so a rank can be matched to a physical GPU
    whatever CUDA_VISIBLE_DEVICES renumbered. Older torch lacks the pci_* properties: fall back to the GPU's UUID."""
    props = torch.cuda.get_device_properties(device)
    if hasattr(props, "pci_bus_id"):
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    return str(getattr(props, "uuid", "?"))


def rank_placement(env: DistEnv) -> dict:
    """Where this rank runs: host, device and (CUDA) the GPU's PCI bus id and the CUDA_VISIBLE_DEVICES it was given."""
    place = {"rank": env.rank, "local_rank": env.local_rank, "host": socket.gethostname(), "device": str(env.device)}
    if env.device.type == "cuda":
        place["pci_bus_id"] = _pci_bus_id(env.device)
        place["visible"] = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    return place


def format_placement(places: list[dict]) -> list[str]:
    """A small table, one line per rank, then a warning for every GPU that more than one rank landed on (more ranks per
    node than visible GPUs: the device index wraps around; NCCL refuses to run two ranks on one GPU)."""
    columns = [("rank", "rank"), ("local", "local_rank"), ("host", "host"), ("device", "device")]
    if any("pci_bus_id" in p for p in places):
        columns += [("pci bus id", "pci_bus_id"), ("CUDA_VISIBLE_DEVICES", "visible")]
    rows = [[str(p.get(key, "-")) for _, key in columns] for p in sorted(places, key=lambda p: p["rank"])]
    widths = [max(len(title), *(len(row[i]) for row in rows)) for i, (title, _) in enumerate(columns)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip([t for t, _ in columns], widths)).rstrip()]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    on_gpu: dict[tuple[str, str], list[int]] = defaultdict(list)
    for p in places:
        if "pci_bus_id" in p:
            on_gpu[p["host"], p["pci_bus_id"]].append(p["rank"])
    for (host, bus), ranks in sorted(on_gpu.items()):
        if len(ranks) > 1:
            lines.append(f"warning: ranks {_rank_list(sorted(ranks))} share the GPU {bus} on host {host}: more ranks "
                         "per node than visible GPUs")
    return lines


def describe_ranks(env: DistEnv) -> list[str]:
    """Every rank's placement as lines of a table (the same lines on every rank). Collective: all ranks call it."""
    return format_placement(every_rank(lambda: rank_placement(env)))


def _rank_list(ranks: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3,5": a line stays short at any world size."""
    parts: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def _sees(path: Path, token: str, wait_s: float) -> bool:
    """Whether `path` holds `token`, polling up to wait_s: a network filesystem may show a new file on another node late
    (cached directory attributes); listing the directory asks the server again."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if path.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        try:
            os.listdir(path.parent)
        except OSError:
            pass
        time.sleep(0.2)


def check_shared_dir(path: str | os.PathLike, env: DistEnv, *, wait_s: float = 5.0) -> None:
    """Stop every rank with the same one-line error unless `path` (train.run_dir) is one directory that all ranks see.

    Every rank writes its checkpoint shards there and rank 0 commits them, so a node-local run_dir would fail only at the
    first checkpoint, possibly hours in. Rank 0 creates the directory and writes a file with a random name and content
    there; every rank then looks for it in the directory *it* was given. Collective: all ranks call it."""
    path = Path(path)
    if env.world_size == 1:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create train.run_dir {path}: {err}") from None
        return

    def publish() -> tuple[str, str]:  # rank 0; its path too: the message must read the same on every rank
        token = secrets.token_hex(16)
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / f".rank0-token-{token}").write_text(token)
        except OSError as err:
            raise UserError(f"rank 0 cannot write to train.run_dir {path}: {err}") from None
        return token, str(path)

    token, shown_path = rank0_decides(publish)
    token_file = path / f".rank0-token-{token}"
    results = every_rank(lambda: (env.rank, socket.gethostname(), env.is_main or _sees(token_file, token, wait_s)))
    if env.is_main:  # every rank has looked: the gather returned
        with contextlib.suppress(OSError):
            token_file.unlink()
    blind: dict[str, list[int]] = defaultdict(list)
    for rank, host, ok in sorted(results):
        if not ok:
            blind[host].append(rank)
    if blind:
        where = ", ".join(f"{_rank_list(ranks)} on host {host}" for host, ranks in blind.items())
        raise UserError(f"train.run_dir {shown_path} is not shared by all ranks: rank(s) {where} cannot see rank 0's "
                        "files; put it on a filesystem every node mounts")

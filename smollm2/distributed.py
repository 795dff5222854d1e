"""The process group and this rank's device (NCCL on CUDA, gloo on CPU), and the startup checks of where ranks run.

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from smollm2.config import Device
from smollm2.errors import ConfigError, UserError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    if "RANK" not in os.environ:  # not under torchrun/srun: a process group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
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
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and world_size > 1:
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
    places: list = [None] * env.world_size
    dist.all_gather_object(places, rank_placement(env))
    return format_placement(places)


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
    first checkpoint, possibly hours in. Rank 0 writes a file with a random name and content; after a broadcast (the
    barrier) every rank reads it; the results are all-gathered so all ranks raise the same error. Collective: all ranks
    call it; rank 0 creates `path` first (inside the check, so a failure there reaches every rank, not just rank 0)."""
    path = Path(path)
    if env.world_size == 1:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create train.run_dir {path}: {err}") from None
        return
    token = secrets.token_hex(16) if env.is_main else None
    token_file = path / f".rank0-token-{token}"
    failure = None
    if env.is_main:
        try:
            path.mkdir(parents=True, exist_ok=True)
            token_file.write_text(token)
        except OSError as err:
            failure = f"rank 0 cannot write to train.run_dir {path}: {err}"
    # rank 0's choice (and its path: the message must read the same on every rank) reaches all ranks after the write
    shared = [token, str(path), failure]
    dist.broadcast_object_list(shared, src=0)
    token, shown_path, failure = shared
    if failure is None:
        # each rank looks in the directory *it* was given: the same file if the directory is shared
        seen = env.is_main or _sees(path / f".rank0-token-{token}", token, wait_s)
        results: list = [None] * env.world_size
        dist.all_gather_object(results, (env.rank, socket.gethostname(), seen))
        if env.is_main:  # every rank has looked: the all-gather returned
            with contextlib.suppress(OSError):
                token_file.unlink()
        blind: dict[str, list[int]] = defaultdict(list)
        for rank, host, ok in sorted(results):
            if not ok:
                blind[host].append(rank)
        if blind:
            where = ", ".join(f"{_rank_list(ranks)} on host {host}" for host, ranks in blind.items())
            failure = (f"train.run_dir {shown_path} is not shared by all ranks: rank(s) {where} cannot see rank 0's files; "
                       "put it on a filesystem every node mounts")
    if failure is not None:
        raise UserError(failure)

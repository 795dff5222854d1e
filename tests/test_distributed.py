"""smollm2.distributed and what the process group decides, on CPU: the device index, the rank placement table, the shared
run_dir check, and the RoPE tables' dtype under FSDP2 mixed precision at world sizes 1 and 2.

Several ranks run as spawned processes joined by a FileStore gloo group (no torchrun), so each rank can be handed
different arguments, e.g. a different run_dir."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import multirank  # tests/ helper
import pytest
import torch
import torch.distributed as dist

from smollm2.distributed import DistEnv, check_shared_dir, describe_ranks, device_index, format_placement

ROOT = Path(__file__).resolve().parents[1]


def run_ranks(fn, args_per_rank: list[tuple], tmp_path: Path, timeout: float = 60) -> list[tuple[str, object]]:
    """fn(env, *args_per_rank[rank]) on len(args_per_rank) gloo ranks (CPU): [(status, result or message)] by rank."""
    return multirank.run_ranks(partial(_with_env, fn), args_per_rank, tmp_path, timeout=timeout)


def _with_env(fn, rank: int, *args):
    return fn(DistEnv(rank, dist.get_world_size(), rank, torch.device("cpu")), *args)


# ------------------------------------------------------------------------------------------------------- device index


def test_device_index_is_local_rank_modulo_visible_gpus():
    assert [device_index(r, 8) for r in range(8)] == list(range(8))  # torchrun: every rank sees the node's GPUs
    assert [device_index(r, 1) for r in range(8)] == [0] * 8  # SLURM per-task binding: each rank sees only its own
    assert [device_index(r, 2) for r in range(4)] == [0, 1, 0, 1]  # two GPUs per task
    with pytest.raises(ValueError):
        device_index(0, 0)


def test_srun_without_torchrun_is_refused(monkeypatch):
    """`srun -n 2 python -m smollm2.train`: no RANK, so each task would be rank 0 of a world of one, racing the other on
    the same checkpoint directories."""
    from smollm2.distributed import init_distributed
    from smollm2.errors import UserError

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(UserError, match=r"^started by srun as task 1 of 2 without torchrun: .* launch/slurm.sbatch"):
        init_distributed("cpu")
    assert not dist.is_initialized()


# ------------------------------------------------------------------------------------------------- placement table


def test_placement_table_lists_every_rank_and_flags_shared_gpus():
    places = [{"rank": r, "local_rank": r % 2, "host": f"node{r // 2}", "device": "cuda:0", "pci_bus_id": bus,
               "visible": str(r % 2)}
              for r, bus in enumerate(["00000000:1B:00.0", "00000000:1C:00.0", "00000000:1B:00.0", "00000000:1B:00.0"])]
    lines = format_placement(list(reversed(places)))  # all_gather order is rank order; the table does not rely on it
    assert lines[0].split() == ["rank", "local", "host", "device", "pci", "bus", "id", "CUDA_VISIBLE_DEVICES"]
    assert [line.split()[:5] for line in lines[1:5]] == [[str(r), str(r % 2), f"node{r // 2}", "cuda:0", p["pci_bus_id"]]
                                                         for r, p in enumerate(places)]
    # ranks 0 and 1 are on different GPUs of node0 (different bus ids); ranks 2 and 3 landed on one GPU of node1
    assert lines[5:] == ["warning: ranks 2-3 share the GPU 00000000:1B:00.0 on host node1: more ranks per node than "
                         "visible GPUs"]


def _describe(env):
    return describe_ranks(env)


@pytest.mark.multirank
def test_describe_ranks_gathers_one_line_per_rank(tmp_path):
    import socket

    (s0, lines0), (s1, lines1) = run_ranks(_describe, [(), ()], tmp_path)
    assert s0 == s1 == "ok", (lines0, lines1)
    assert lines0 == lines1  # the same table on every rank (rank 0 prints it)
    assert lines0[0].split() == ["rank", "local", "host", "device"]
    assert [line.split() for line in lines0[1:]] == [["0", "0", socket.gethostname(), "cpu"],
                                                     ["1", "1", socket.gethostname(), "cpu"]]


# -------------------------------------------------------------------------------------------------- shared run_dir


def _check(env, run_dir):
    if env.is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    check_shared_dir(run_dir, env, wait_s=0.5)


@pytest.mark.multirank
def test_shared_run_dir_passes_and_leaves_nothing_behind(tmp_path):
    run_dir = tmp_path / "run"
    assert run_ranks(_check, [(str(run_dir),), (str(run_dir),)], tmp_path) == [("ok", None), ("ok", None)]
    assert list(run_dir.iterdir()) == []  # rank 0 removed the token file once every rank had looked


@pytest.mark.multirank
def test_run_dir_not_shared_stops_every_rank_with_one_line(tmp_path):
    import socket

    # rank 1 is given another directory, as a node-local path on another node would be
    (tmp_path / "node1").mkdir()
    results = run_ranks(_check, [(str(tmp_path / "node0/run"),), (str(tmp_path / "node1/run"),)], tmp_path)
    expected = (f"train.run_dir {tmp_path / 'node0/run'} is not shared by all ranks: rank(s) 1 on host "
                f"{socket.gethostname()} cannot see rank 0's files; put it on a filesystem every node mounts")
    for status, message in results:
        assert status == "UserError"
        assert message.splitlines()[0] == expected


# ------------------------------------------------------------------------------------------ RoPE tables under FSDP2


def _rope_dtypes(env) -> dict:
    """Build the training model as train does (bf16) with each FSDP layout, run a forward + backward, and return, per
    layout, the dtypes every Attention saw for x, cos and sin, and the loss."""
    from smollm2.config import load_config
    from smollm2.model.model import Attention
    from smollm2.parallelize import build_model

    out = {}
    for wrap in ("block", "root"):
        cfg = load_config(ROOT / "configs/tiny.yaml", ["train.dtype=bf16", f"train.fsdp_wrap={wrap}"])
        model = build_model(cfg, env)
        seen = set()
        for module in model.modules():
            if isinstance(module, Attention):
                module.register_forward_pre_hook(lambda mod, args, seen=seen: seen.add(tuple(str(a.dtype) for a in args[:3])))
        idx = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        out[wrap] = (sorted(seen), loss.item())
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("world_size", [1, 2])
def test_rope_tables_stay_fp32_under_bf16_at_every_world_size_and_fsdp_layout(tmp_path, world_size):
    """Per-block FSDP units used to cast the blocks' float inputs, the cos/sin tables included, to bf16; one root unit
    did not: 1 GPU and 8 GPUs trained different numerics. Now every layout hands the blocks fp32 tables."""
    results = run_ranks(_rope_dtypes, [()] * world_size, tmp_path)
    for status, by_wrap in results:
        assert status == "ok", by_wrap
        for wrap, (dtypes, _) in by_wrap.items():
            assert dtypes == [("torch.bfloat16", "torch.float32", "torch.float32")], (wrap, dtypes)
        # and with the same inputs the two layouts compute the same loss (each rank ran the same batch)
        assert by_wrap["block"][1] == by_wrap["root"][1]


# ---------------------------------------------------------------------- a restarted attempt under torchrun's store


def _attempt_rank(rank: int, port: int, delay_s: float, out: list) -> None:
    import datetime
    import time

    from smollm2.distributed import attempt_store

    time.sleep(delay_s)
    store = attempt_store(rank, datetime.timedelta(seconds=20), check_s=0.3)
    out.append((rank, store.name))
    store.prefixed.set(f"hello/{rank}", "x")
    store.prefixed.get(f"hello/{1 - rank}")  # both ranks meet under the same name
    store.close()


def test_a_restarted_attempt_never_takes_the_dead_attempts_store_keys(monkeypatch):
    """torchrun keeps its store across --max-restarts: the dead attempt's name is still published when the new attempt's
    rank 1 looks, before the new rank 0 has started. Rank 1 must wait for the live name, not take the stale one."""
    import threading

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    server.set("smollm2/attempt", "dead-attempt")  # what the killed attempt's rank 0 published; it ticks no more
    server.add("smollm2/attempt/dead-attempt/tick", 5)
    server.set("smollm2/dead-attempt/hello/0", "stale")
    out: list = []
    threads = [threading.Thread(target=_attempt_rank, args=(rank, server.port, delay, out))
               for rank, delay in ((1, 0.0), (0, 1.0))]  # rank 1 first: it sees the stale name
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    names = dict(out)
    assert names[0] == names[1] != "dead-attempt"

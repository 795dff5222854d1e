"""Per-group gradient norms and histograms under FSDP2: a sharded gradient's norm is not its local shard's.

Two gloo ranks (spawned, FileStore) run one batch through the tiny model sharded with FSDP2; this process runs the same
batch through the same weights unsharded (no FSDP, no process group). The per-group norms agree across the ranks, with
an independent computation from the gathered full gradients and with the unsharded model's; the histograms count every
value once, into the same bins; and the squares of the group norms add up to the total norm that clipping computes."""

from __future__ import annotations

import math
from pathlib import Path

import multirank  # tests/ helper
import pytest
import torch
import torch.distributed as dist

from smollm2.config import load_config
from smollm2.distributed import DistEnv
from smollm2.model import SmolLM
from smollm2.observe.gradflow import group_grad_norms, group_histograms, group_of

ROOT = Path(__file__).resolve().parents[1]
BINS = 32


def test_group_names():
    assert group_of("embed.weight") == "embed"
    assert group_of("blocks.0.norm1.weight") == "block_00/norm"
    assert group_of("blocks.11.norm2.bias") == "block_11/norm"
    assert group_of("blocks.3.attn.qkv.weight") == "block_03/attn"
    assert group_of("blocks.3._orig_mod.mlp.fc.bias") == "block_03/mlp"  # compiled blocks
    assert group_of("blocks.3._checkpoint_wrapped_module.attn.proj.weight") == "block_03/attn"
    assert group_of("norm.weight") == "final_norm"
    assert group_of("head.weight") == "head"  # an untied LM head


def _setup():
    """The config, the unsharded model (seeded: the same weights in every process) and the batch."""
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.dtype=fp32"])
    torch.manual_seed(0)
    plain = SmolLM(cfg.model)
    idx = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=torch.Generator().manual_seed(7))
    return cfg, plain, idx


def _total(model) -> float:
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # what train_step logs as grad_norm
    return float(total.full_tensor() if hasattr(total, "full_tensor") else total)


def _numel(model) -> dict[str, int]:
    numel: dict[str, int] = {}
    for name, p in model.named_parameters():
        numel[group_of(name)] = numel.get(group_of(name), 0) + p.numel()  # a DTensor's full (logical) size
    return numel


def _sharded(rank: int, dp_shard: int = 0) -> dict:
    """One rank of the FSDP2 model (build_model: DTensor parameters sharded on dim 0; HSDP with dp_shard), the same batch
    on every rank."""
    from smollm2.parallelize import build_model, copy_full_into

    cfg, plain, idx = _setup()
    cfg.train.dp_shard = dp_shard
    model = build_model(cfg, DistEnv(rank, dist.get_world_size(), rank, torch.device("cpu")))
    with torch.no_grad():
        for name, param in model.named_parameters():
            copy_full_into(param, plain.state_dict()[name])
    model(idx[:, :-1], idx[:, 1:]).backward()  # every rank the same batch: the averaged gradient is the batch's
    norms = group_grad_norms(model)
    squares: dict[str, float] = {}  # independently: gather each full gradient, square-sum in float64
    for name, p in model.named_parameters():
        squares[group_of(name)] = squares.get(group_of(name), 0.0) + p.grad.full_tensor().double().pow(2).sum().item()
    plain(idx[:, :-1], idx[:, 1:]).backward()
    return {"norms": norms, "gathered": {g: math.sqrt(s) for g, s in squares.items()}, "total": _total(model),
            "hists": group_histograms(model, "grad", bins=BINS), "params": group_histograms(model, "param", bins=BINS),
            "numel": _numel(model),
            # plain tensors on every rank (replicated): each counted once, not once per rank
            "replicated": group_grad_norms(plain)}


@pytest.mark.multirank
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size,dp_shard", [(2, 0), (4, 2)], ids=["fsdp-2", "hsdp-2x2"])
def test_group_norms_under_fsdp2_equal_the_unsharded_computation(tmp_path, world_size, dp_shard):
    _, plain, idx = _setup()
    plain(idx[:, :-1], idx[:, 1:]).backward()
    norms = group_grad_norms(plain)  # one process, no process group, no sharding
    hists, params = group_histograms(plain, "grad", bins=BINS), group_histograms(plain, "param", bins=BINS)
    assert set(norms) == {"embed", "final_norm"} | {f"block_0{i}/{k}" for i in range(2) for k in ("attn", "mlp", "norm")}
    assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(_total(plain), rel=1e-5)

    results = multirank.run_ranks(_sharded, [(dp_shard,)] * world_size, tmp_path, timeout=180)
    for status, value in results:
        assert status == "ok", value
    ranks = [value for _, value in results]
    for r in ranks:
        # fp32 sums in another order (per shard, then across ranks): equal within 1e-5 relative
        for group, value in norms.items():
            assert value > 0
            assert r["norms"][group] == pytest.approx(value, rel=1e-5), group
            assert r["gathered"][group] == pytest.approx(value, rel=1e-5), group
            assert r["replicated"][group] == pytest.approx(value, rel=1e-5), group
        assert set(r["norms"]) == set(norms)
        # the squares add up to the total norm's square (clip_grad_norm_'s, the logged grad_norm)
        assert math.sqrt(sum(v * v for v in r["norms"].values())) == pytest.approx(r["total"], rel=1e-5)
        # histograms: every value of the full tensor counted once, into the unsharded model's bins
        for group, (counts, edges) in r["hists"].items():
            assert sum(counts) == r["numel"][group] and len(edges) == len(counts) + 1 == BINS + 1
            assert counts == hists[group][0] and edges == pytest.approx(hists[group][1], rel=1e-6)
            assert r["params"][group][0] == params[group][0]
    assert all(r["norms"] == ranks[0]["norms"] for r in ranks)  # every rank logs the same numbers

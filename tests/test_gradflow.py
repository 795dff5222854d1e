"""Per-group gradient norms and histograms under FSDP2: a sharded gradient's norm is not its local shard's.

Two gloo ranks (spawned, FileStore) and one rank run the same batch through the tiny model; the per-group norms agree
with each other and with an independent computation from the gathered full gradients, and their squares add up to the
total norm that clipping computes."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import multirank  # tests/ helper
import pytest
import torch
import torch.distributed as dist

from smollm2.distributed import DistEnv
from smollm2.gradflow import group_grad_norms, group_histograms, group_of

ROOT = Path(__file__).resolve().parents[1]


def test_group_names():
    assert group_of("embed.weight") == "embed"
    assert group_of("blocks.0.norm1.weight") == "block_00/norm"
    assert group_of("blocks.11.norm2.bias") == "block_11/norm"
    assert group_of("blocks.3.attn.qkv.weight") == "block_03/attn"
    assert group_of("blocks.3._orig_mod.mlp.fc.bias") == "block_03/mlp"  # compiled blocks
    assert group_of("blocks.3._checkpoint_wrapped_module.attn.proj.weight") == "block_03/attn"
    assert group_of("norm.weight") == "final_norm"


def _flow(rank: int, n_ranks: int):
    from smollm2.config import load_config
    from smollm2.model import SmolLM
    from smollm2.parallelize import build_model, copy_full_into

    env = DistEnv(rank, dist.get_world_size(), rank, torch.device("cpu"))
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.dtype=fp32"])
    model = build_model(cfg, env)
    torch.manual_seed(0)  # the same weights at every world size (sharded random init draws differently per layout)
    reference = SmolLM(cfg.model).state_dict()
    with torch.no_grad():
        for name, param in model.named_parameters():
            copy_full_into(param, reference[name])
    idx = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=torch.Generator().manual_seed(7))
    model(idx[:, :-1], idx[:, 1:]).backward()  # every rank the same batch: the averaged gradient is the batch's
    norms = group_grad_norms(model)
    # independently: gather each full gradient and take the norms in float64
    squares: dict[str, float] = {}
    for name, p in model.named_parameters():
        full = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        squares[group_of(name)] = squares.get(group_of(name), 0.0) + full.double().pow(2).sum().item()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    total = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
    hists = group_histograms(model, "grad", bins=32)
    params = group_histograms(model, "param", bins=32)
    numel = {}
    for name, p in model.named_parameters():
        numel[group_of(name)] = numel.get(group_of(name), 0) + p.numel()  # the full (logical) size of a DTensor
    return norms, {g: math.sqrt(s) for g, s in squares.items()}, total, hists, params, numel


def _run(n: int, tmp_path: Path):
    results = multirank.run_ranks(partial(_flow, n_ranks=n), [()] * n, tmp_path / f"ws{n}", timeout=120)
    for status, value in results:
        assert status == "ok", value
    return [value for _, value in results]


@pytest.mark.timeout(300)
def test_group_norms_under_fsdp2_equal_the_unsharded_computation(tmp_path):
    one = _run(1, tmp_path)[0]
    two = _run(2, tmp_path)
    norms1 = one[0]
    assert set(norms1) == {"embed", "final_norm"} | {f"block_0{i}/{k}" for i in range(2) for k in ("attn", "mlp", "norm")}
    for norms, gathered, total, hists, params, numel in [one, *two]:
        # the same on every rank, equal to the gathered full gradients' norms and to one process's (fp32 sums in another
        # order: within 1e-5 relative)
        for group, value in norms.items():
            assert value > 0
            assert value == pytest.approx(gathered[group], rel=1e-5), group
            assert value == pytest.approx(norms1[group], rel=1e-5), group
        # the squares add up to the total norm's square (what clipping computes)
        assert math.sqrt(sum(v * v for v in norms.values())) == pytest.approx(total, rel=1e-5)
        # histograms: every value of the full tensor counted once, over the same range as one process
        for group, (counts, edges) in hists.items():
            assert sum(counts) == numel[group] and len(edges) == len(counts) + 1 == 33
            assert counts == one[3][group][0] and edges == pytest.approx(one[3][group][1], rel=1e-6)
            assert params[group][0] == one[4][group][0]
    assert two[0][0] == two[1][0]  # both ranks log the same numbers

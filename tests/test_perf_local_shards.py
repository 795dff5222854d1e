"""Clipping and AdamW on the local shards compute what torch's DTensor paths compute.

`smollm2.step.clip_grad_norm` (one `_foreach_norm` on the local gradients, one all-reduce of the squared norm) against
`torch.nn.utils.clip_grad_norm_` over the DTensors, and `smollm2.optim.LocalAdamW` (the update on `to_local()` views)
against `torch.optim.AdamW` over the DTensors, on real gloo ranks (spawned processes) at world sizes 1, 2 and 3, FSDP2 as
training builds it; HSDP's (Replicate, Shard) placements at world size 2."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import multirank  # tests/ helper
import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multirank


def _tiny_model(seed: int = 0):
    from smollm2.config import load_config
    from smollm2.distributed import DistEnv
    from smollm2.parallelize import build_model

    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.device=cpu", "model.n_layer=2", "model.d_model=32",
                                                    "model.d_mlp=64", "model.n_head=2", "model.vocab_size=200"])
    env = DistEnv(dist.get_rank(), dist.get_world_size(), dist.get_rank(), torch.device("cpu"))
    return cfg, build_model(cfg, env, init_seed=seed)


def _backward(model, cfg, rank: int, step: int = 0) -> None:
    idx = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(100 * step + rank))
    model(idx[:, :-1], idx[:, 1:]).backward()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # plain tensors: a world-size-1 model without FSDP2


def _clip_both(params, max_norm):
    """(torch's total, ours, the largest relative difference between the clipped gradients)."""
    from smollm2.step import clip_grad_norm

    saved = [p.grad.detach().clone() for p in params]
    theirs = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    theirs = float(theirs.full_tensor() if hasattr(theirs, "full_tensor") else theirs)
    clipped = [p.grad.detach().clone() for p in params]
    for p, g in zip(params, saved):
        p.grad = g
    ours = clip_grad_norm(params, max_norm)
    assert not hasattr(ours, "full_tensor"), "the total norm is a plain tensor"
    worst = 0.0
    for p, want in zip(params, clipped):
        got, want = _local(p.grad), _local(want)
        worst = max(worst, float(((got - want).abs() / want.abs().clamp_min(1e-30)).max()) if want.numel() else 0.0)
    return theirs, float(ours), worst


def _clip_scenario(rank: int):
    cfg, model = _tiny_model()
    _backward(model, cfg, rank)
    params = list(model.parameters())
    out = {"fsdp": _clip_both(params, 0.05), "fsdp_no_clip": _clip_both(params, None)}
    if dist.get_world_size() == 2:  # HSDP: replicated over mesh dim 0, sharded over dim 1 (size 1 here)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        for shape in ((2, 1), (1, 2)):
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
            gen = torch.Generator().manual_seed(7)  # the same full tensors on every rank
            hsdp = []
            for size in ((6, 4), (5,), (3, 3)):
                p = torch.nn.Parameter(distribute_tensor(torch.randn(size, generator=gen), mesh, [Replicate(), Shard(0)]))
                p.grad = distribute_tensor(torch.randn(size, generator=gen), mesh, [Replicate(), Shard(0)])
                hsdp.append(p)
            out[f"hsdp{shape}"] = _clip_both(hsdp, 0.5)
    return out


def _adamw_scenario(rank: int, fused: bool):
    """Today's optimizer (torch.optim.AdamW over the DTensors, fused or foreach) and ours (fused, or on CPU unfused: torch's
    single-tensor loop over the local shards) on two copies of the model, 3 steps with the same gradients: the
    parameters and the state must agree bitwise, and the state dicts hold the same (DTensor) state."""
    from torch.distributed.tensor import DTensor

    from smollm2.optim import LocalAdamW, build_optimizer

    cfg, theirs_model = _tiny_model()
    _, ours_model = _tiny_model()
    ours = build_optimizer(ours_model, replace(cfg.optim, fused=fused), torch.device("cpu"))
    assert isinstance(ours, LocalAdamW)
    theirs = torch.optim.AdamW([{"params": [p for p in theirs_model.parameters() if p.dim() >= 2],
                                 "weight_decay": cfg.optim.weight_decay},
                                {"params": [p for p in theirs_model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                               lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                               fused=fused, foreach=None if fused else True)
    for step in range(3):
        _backward(theirs_model, cfg, rank, step)
        for p, q in zip(theirs_model.parameters(), ours_model.parameters()):
            q.grad = p.grad.detach().clone()
        theirs.step()
        ours.step()
        theirs.zero_grad(set_to_none=True)
        ours.zero_grad(set_to_none=True)
    same_params = all(torch.equal(_local(p), _local(q))
                      for p, q in zip(theirs_model.parameters(), ours_model.parameters()))
    a, b = theirs.state_dict(), ours.state_dict()
    math = lambda groups: [{k: v for k, v in g.items() if k != "foreach"} for g in groups]  # noqa: E731 - how, not what
    same_state = math(a["param_groups"]) == math(b["param_groups"]) and a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            other = b["state"][key][name]
            same_state &= type(value) is type(other) and torch.equal(_local(value), _local(other))
    moments_are_dtensors = all(isinstance(s["exp_avg"], DTensor) == isinstance(p, DTensor)  # like the parameters
                               for s, p in zip(b["state"].values(), ours_model.parameters()))
    return same_params, same_state, moments_are_dtensors


def _scenario(rank: int):
    return {"clip": _clip_scenario(rank), "adamw_unfused": _adamw_scenario(rank, False),
            "adamw_fused": _adamw_scenario(rank, True)}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_local_clipping_and_adamw_match_torch_over_dtensors(tmp_path, world_size):
    results = multirank.run_ranks(_scenario, [()] * world_size, tmp_path, timeout=180)
    for rank, (status, value) in enumerate(results):
        assert status == "ok", value
        for case, (theirs, ours, worst) in value["clip"].items():
            if world_size == 1:  # the same reduction as torch's on one rank: bitwise
                assert ours == theirs and worst == 0.0, (case, theirs, ours, worst)
            if not case.startswith("hsdp"):  # one mesh dim: the same reduction as DTensor's, bitwise
                assert ours == theirs and worst == 0.0, (rank, case, theirs, ours, worst)
            assert ours == pytest.approx(theirs, rel=1e-6), (rank, case)
            assert worst <= 1e-6, (rank, case, worst)
        assert value["clip"]["fsdp"][0] > 0.05  # the clip really clipped
        for name in ("adamw_unfused", "adamw_fused"):
            assert value[name] == (True, True, True), (rank, name, value[name])
    if world_size == 2:
        assert {"hsdp(2, 1)", "hsdp(1, 2)"} <= set(results[0][1]["clip"])

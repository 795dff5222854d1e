"""How the model is built to run (smollm2/parallelize.py) does not change what it computes: activation checkpointing
(full, selective) and the FSDP units (per block, one root unit) train the same losses; and world size 1 without FSDP2
(`train.fsdp_wrap=auto`, docs/performance.md) trains bitwise like the FSDP2 root unit, fp32 and bf16 (FSDP2's
MixedPrecisionPolicy reproduced by casting the parameters in the forward), with gradient accumulation and clipping.
Each scenario runs on a spawned one-rank gloo group."""

from __future__ import annotations

from pathlib import Path

import multirank  # tests/ helper
import pytest
import torch

from smollm2.config import FsdpWrap, load_config
from smollm2.parallelize import compile_options, fsdp_units

ROOT = Path(__file__).resolve().parents[1]


def test_auto_means_no_fsdp2_at_world_size_1_only():
    assert fsdp_units(FsdpWrap.auto, 1) is None and fsdp_units(FsdpWrap.auto, 2) == FsdpWrap.block


def test_dp_shard_must_divide_the_world_size():
    from smollm2.distributed import DistEnv
    from smollm2.errors import ConfigError
    from smollm2.parallelize import build_model

    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.dp_shard=3"])
    with pytest.raises(ConfigError, match=r"^train.dp_shard=3 must divide the world size \(2\): ranks per shard group"):
        build_model(cfg, DistEnv(0, 2, 0, torch.device("cpu")))  # refused before any collective


def test_cpp_wrapper_auto_is_on_for_cpu_only():  # measured on CPU (docs/performance.md); a GPU row measures it there
    assert compile_options(None, torch.device("cpu")) == {"cpp_wrapper": True}
    assert compile_options(None, torch.device("cuda")) == {"cpp_wrapper": False}
    assert compile_options(False, torch.device("cpu")) == {"cpp_wrapper": False}


def _batches(vocab: int, steps: int = 4, accum: int = 2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        idx = [torch.randint(0, vocab, (2, 33), generator=generator) for _ in range(accum)]
        out.append([(i[:, :-1].contiguous(), i[:, 1:].contiguous()) for i in idx])
    return out


def _losses_by_layout(rank: int, config: str) -> dict:
    """fp32, three steps of each (recompute, FSDP units) layout from the same weights and batches."""
    import torch.distributed as dist

    from smollm2.config import load_config
    from smollm2.distributed import DistEnv
    from smollm2.optim import build_optimizer
    from smollm2.parallelize import build_model
    from smollm2.step import train_step

    torch.set_num_threads(1)
    env = DistEnv(rank, dist.get_world_size(), rank, torch.device("cpu"))
    out = {}
    for mode, wrap in (("none", "block"), ("none", "root"), ("full", "root"), ("selective", "block")):
        cfg = load_config(ROOT / config, ["train.device=cpu", "train.dtype=fp32", "train.compile=false",
                                                        f"train.activation_checkpointing={mode}", f"train.fsdp_wrap={wrap}"])
        model = build_model(cfg, env)
        optimizer = build_optimizer(model, cfg.optim, env.device)
        out[mode, wrap] = [float(train_step(model, optimizer, batch, 2, 1.0)[0]) for batch in _batches(cfg.model.vocab_size, 3)]
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("config", ["configs/tiny.yaml", "configs/tiny_llama.yaml"])
def test_activation_checkpointing_and_fsdp_units_do_not_change_the_math(tmp_path, config):
    ((status, by_layout),) = multirank.run_ranks(_losses_by_layout, [(config,)], tmp_path, timeout=240,
                                                 group_timeout_s=60)
    assert status == "ok", by_layout
    for layout in (("none", "root"), ("full", "root"), ("selective", "block")):
        assert by_layout[layout] == pytest.approx(by_layout["none", "block"], rel=1e-6), layout


def _train(rank: int, dtype: str, compile_: bool):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from smollm2.config import load_config
    from smollm2.distributed import DistEnv
    from smollm2.optim import build_optimizer
    from smollm2.parallelize import build_model
    from smollm2.step import train_step

    env = DistEnv(rank, dist.get_world_size(), rank, torch.device("cpu"))
    out = {}
    for wrap in ("auto", "root"):
        # one block and no C++ wrapper (it launches the same kernels, bitwise, both layouts alike): a shorter cold compile
        cfg = load_config(ROOT / "configs/tiny.yaml", ["model.n_layer=1", "train.device=cpu", f"train.dtype={dtype}",
                                                        "train.cpp_wrapper=false", f"train.fsdp_wrap={wrap}",
                                                        f"train.compile={str(compile_).lower()}"])
        model = build_model(cfg, env)
        assert any(isinstance(p, DTensor) for p in model.parameters()) == (wrap == "root")
        optimizer = build_optimizer(model, cfg.optim, env.device)
        history = []
        for batches in _batches(cfg.model.vocab_size):  # grad_accum 2: FSDP2 accumulates without sync, then reduces
            loss, norm = train_step(model, optimizer, batches, 2, 0.5)
            history.append((float(loss), float(norm)))
        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in model.state_dict().items()}
        out[wrap] = (history, state)
    (plain_history, plain_state), (fsdp_history, fsdp_state) = out["auto"], out["root"]
    return plain_history == fsdp_history, all(torch.equal(plain_state[k], fsdp_state[k]) for k in fsdp_state)


@pytest.mark.multirank
@pytest.mark.parametrize("dtype,compile_", [("fp32", False), ("bf16", False),
                                            pytest.param("bf16", True, marks=pytest.mark.compile)])
def test_world_size_one_without_fsdp_trains_bitwise_like_the_root_unit(tmp_path, dtype, compile_):
    ((status, value),) = multirank.run_ranks(_train, [(dtype, compile_)], tmp_path, timeout=240, group_timeout_s=60)
    assert status == "ok", value
    assert value == (True, True)

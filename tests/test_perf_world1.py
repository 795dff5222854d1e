"""World size 1 without FSDP2 (bench/NOTES.md v3): the plain model with `train.fsdp_wrap=auto` trains bitwise like the
FSDP2 root unit (`train.fsdp_wrap=root`), fp32 and bf16 (FSDP2's MixedPrecisionPolicy reproduced by casting the
parameters in the forward), with gradient accumulation and clipping."""

from __future__ import annotations

from pathlib import Path

import multirank  # tests/ helper
import pytest
import torch

from smollm2.config import FsdpWrap
from smollm2.parallelize import compile_options, fsdp_units

ROOT = Path(__file__).resolve().parents[1]


def test_auto_means_no_fsdp2_at_world_size_1_only():
    assert fsdp_units(FsdpWrap.auto, 1) is None and fsdp_units(FsdpWrap.auto, 2) == FsdpWrap.block


def test_cpp_wrapper_auto_is_on_for_cpu_only():  # bench/NOTES.md v4: measured on CPU; a GPU row measures it there
    assert compile_options(None, torch.device("cpu")) == {"cpp_wrapper": True}
    assert compile_options(None, torch.device("cuda")) == {"cpp_wrapper": False}
    assert compile_options(False, torch.device("cpu")) == {"cpp_wrapper": False}


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
        # the C++ wrapper launches the same kernels (bitwise, both layouts alike): off here, for a shorter cold compile
        cfg = load_config(ROOT / "configs/tiny.yaml", ["train.device=cpu", f"train.dtype={dtype}", "train.cpp_wrapper=false",
                                                        f"train.fsdp_wrap={wrap}", f"train.compile={str(compile_).lower()}"])
        model = build_model(cfg, env)
        assert any(isinstance(p, DTensor) for p in model.parameters()) == (wrap == "root")
        optimizer = build_optimizer(model, cfg.optim, env.device)
        generator = torch.Generator().manual_seed(0)
        history = []
        for _ in range(4):
            batches = []
            for _ in range(2):  # grad_accum 2: FSDP2 accumulates without sync, then reduces
                idx = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=generator)
                batches.append((idx[:, :-1].contiguous(), idx[:, 1:].contiguous()))
            loss, norm = train_step(model, optimizer, batches, 2, 0.5)
            history.append((float(loss), float(norm)))
        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in model.state_dict().items()}
        out[wrap] = (history, state)
    (plain_history, plain_state), (fsdp_history, fsdp_state) = out["auto"], out["root"]
    return plain_history == fsdp_history, all(torch.equal(plain_state[k], fsdp_state[k]) for k in fsdp_state)


@pytest.mark.parametrize("dtype,compile_", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_world_size_one_without_fsdp_trains_bitwise_like_the_root_unit(tmp_path, dtype, compile_):
    ((status, value),) = multirank.run_ranks(_train, [(dtype, compile_)], tmp_path, timeout=240, group_timeout_s=60)
    assert status == "ok", value
    assert value == (True, True)

"""AdamW (decay groups, the CPU update's implementation) and the learning-rate schedule."""

import pytest
import torch

from smollm2.config import ModelConfig, OptimConfig
from smollm2.model import SmolLM
from smollm2.optim import LRSchedule, build_optimizer


def test_warmup_then_cosine_to_the_floor():
    s = LRSchedule(OptimConfig(lr=1.0, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1, schedule="cosine"))
    assert [s.lr_at(i) for i in range(3)] == [0.1, 0.2, 0.3]
    assert s.lr_at(9) == 1.0 and s.lr_at(10) == 1.0
    assert s.lr_at(60) == pytest.approx(0.55)  # halfway: floor + (peak - floor) / 2
    assert s.lr_at(110) == pytest.approx(0.1) and s.lr_at(500) == pytest.approx(0.1)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_phase_two_continues_the_curve():
    """The spec's schedule: phase 1 stops at 5000, phase 2 resumes to 5050 on the same curve (no re-warmup, no jump)."""
    s = LRSchedule(OptimConfig(lr=5e-4, warmup_steps=200, decay_steps=5050, min_lr_ratio=0.1))
    before, after = s.lr_at(4999), s.lr_at(5000)
    assert after < before and before - after < 1e-8
    assert s.lr_at(5049) == pytest.approx(5e-5, rel=1e-3)
    assert s.lr_at(5000) > 5e-5  # still decaying, not at a warmup value
    assert s.changes_from(s.state_dict()) == []
    other = LRSchedule(OptimConfig(lr=5e-4, warmup_steps=200, decay_steps=6000))
    assert other.changes_from(s.state_dict()) == ["optim.decay_steps: 5050 -> 6000"]


def test_wsd_and_constant():
    wsd = LRSchedule(OptimConfig(lr=1.0, warmup_steps=0, decay_steps=100, wsd_decay_fraction=0.2, min_lr_ratio=0.0,
                                 schedule="wsd"))
    assert wsd.lr_at(0) == 1.0 and wsd.lr_at(79) == 1.0
    assert wsd.lr_at(90) == pytest.approx(0.5) and wsd.lr_at(100) == 0.0
    const = LRSchedule(OptimConfig(lr=0.3, warmup_steps=2, schedule="constant"))
    assert [const.lr_at(i) for i in (0, 1, 2, 1000)] == [0.15, 0.3, 0.3, 0.3]


def test_weight_decay_on_matrices_and_embeddings_only():
    model = SmolLM(ModelConfig(n_layer=1, n_head=2, d_model=16, d_mlp=32, max_seq_len=16))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.embed.weight for p in decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params(logical=False)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_unfused_cpu_default_is_the_single_tensor_loop_and_bitwise_foreach():
    """optim.fused=null on CPU: torch's single-tensor AdamW (faster there than foreach, whose CPU ops are per-tensor loops
    too; bench/NOTES.md v4), and the same update as foreach to the bit."""
    cfg = OptimConfig(lr=3e-3)
    models = [SmolLM(ModelConfig(n_layer=1, n_head=2, d_model=16, d_mlp=32, max_seq_len=16)) for _ in range(2)]
    for model in models:
        model.init_weights(0)
    ours = build_optimizer(models[0], cfg, torch.device("cpu"))
    assert ours.defaults["foreach"] is False and ours.defaults["fused"] is False
    foreach = build_optimizer(models[1], cfg, torch.device("cpu"))
    for group in foreach.param_groups:
        group["foreach"] = True
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        ours.step()
        foreach.step()
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))


"""AdamW (decay groups, the CPU update's implementation) and the learning-rate schedule."""

import json

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



# ------------------------------------------------------------------------------------------------------- spike guard

GUARD = OptimConfig(lr=1e-2, warmup_steps=0, spike_guard=True, spike_window=4, spike_z_loss=6.0, spike_z_grad=6.0,
                    spike_max_skips=2)
SPIKE_CFG = ModelConfig(n_layer=1, n_head=2, d_model=32, d_mlp=64, vocab_size=64, pad_vocab_multiple=64, max_seq_len=16)


class Scaled(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.factor = model, 1.0

    def forward(self, x, y):
        return self.model(x, y) * self.factor


def guarded_run(batches, spikes=(), state=None, skip=()):
    """Train a tiny model with the spike guard on `batches` (step s = batches[s - 1]); the loss of the steps in `spikes`
    is scaled by 1000 (a test hook: its gradients too); the steps in `skip` are left out altogether. Returns the losses
    by step, the guard, and the model and optimizer state."""
    from smollm2.optim import SpikeGuard
    from smollm2.step import train_step

    torch.manual_seed(0)
    model = SmolLM(SPIKE_CFG)
    model.init_weights(0)
    optimizer, guard = build_optimizer(model, GUARD, torch.device("cpu")), SpikeGuard(GUARD, torch.device("cpu"))
    if state is not None:
        model.load_state_dict(state[0]), optimizer.load_state_dict(state[1]), guard.load_state_dict(state[2])
    scaled, losses = Scaled(model), {}
    for step, (x, y) in enumerate(batches, start=1 if state is None else state[3] + 1):
        if step in skip:
            continue
        scaled.factor = 1000.0 if step in spikes else 1.0
        loss, _ = train_step(scaled, optimizer, [(x, y)], 1, None,  # unclipped: a spike applied shows
                             before_update=lambda loss, norm, step=step: guard.decide(optimizer, loss, norm, step))
        losses[step] = float(loss)
    return losses, guard, (model.state_dict(), optimizer.state_dict(), guard.state_dict(), step)


def spike_batches(n):
    g = torch.Generator().manual_seed(1)
    return [(lambda w: (w[:, :-1], w[:, 1:]))(torch.randint(0, 64, (2, 17), generator=g)) for _ in range(n)]


def test_a_spike_is_skipped_and_the_run_goes_on_as_if_its_step_had_not_been():
    batches = spike_batches(14)
    spiked, guard, _ = guarded_run(batches, spikes={9})
    assert guard.take() == (1, 1, 0)  # one skip, none in a row beyond it
    without, _, _ = guarded_run(batches, skip={9})
    assert {s: v for s, v in spiked.items() if s != 9} == without  # bitwise: the update of step 9 never happened
    early, guard, _ = guarded_run(batches[:4], spikes={3})  # before the window is full: not judged, and so applied
    assert guard.take() == (0, 0, 0) and early[4] != without[4]


def test_the_window_survives_a_checkpoint_and_too_many_skips_in_a_row_stop_the_run():
    batches = spike_batches(14)
    whole, guard, _ = guarded_run(batches, spikes={9})
    first, _, state = guarded_run(batches[:7])
    state = json.loads(json.dumps(state[2])), state
    resumed, guard_b, _ = guarded_run(batches[7:], spikes={9}, state=(*state[1][:2], state[0], 7))
    assert {**first, **resumed} == whole and guard_b.take() == (1, 1, 0)
    _, tripped, _ = guarded_run(batches, spikes={9, 10})
    assert tripped.take() == (2, 2, 10)  # spike_max_skips=2 in a row, ending at step 10: the trainer stops there


def test_the_guard_needs_the_fused_adamw(root):
    from smollm2.config import load_config
    from smollm2.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.spike_guard skips an update inside the fused AdamW"):
        load_config(root / "configs/tiny.yaml", ["optim.spike_guard=true", "optim.fused=false"])
    assert build_optimizer(SmolLM(SPIKE_CFG), GUARD, torch.device("cpu")).defaults["fused"]


def _guarded_ranks(rank: int) -> tuple:
    """Rank `rank` of 2 under FSDP2 with the guard; a spike in rank 1's loss alone at step 7."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from smollm2.config import load_config
    from smollm2.distributed import DistEnv
    from smollm2.optim import SpikeGuard
    from smollm2.parallelize import build_model
    from smollm2.step import train_step

    cfg = load_config("configs/tiny.yaml", ["model.n_layer=1", "model.vocab_size=64", "model.pad_vocab_multiple=64",
                                            "train.device=cpu", "train.dtype=fp32", "train.compile=false",
                                            "train.fsdp_wrap=block", "optim.spike_guard=true", "optim.spike_window=4",
                                            "optim.spike_z_loss=6", "optim.spike_z_grad=6", "optim.warmup_steps=0"])
    env = DistEnv(rank, dist.get_world_size(), rank, torch.device("cpu"))
    model = build_model(cfg, env)
    optimizer, guard, scaled = build_optimizer(model, cfg.optim, env.device), SpikeGuard(cfg.optim, env.device), Scaled(model)
    torch.manual_seed(rank)  # each rank its own data
    for step in range(1, 10):
        window = torch.randint(0, 64, (2, 17))
        scaled.factor = 1000.0 if (step, rank) == (7, 1) else 1.0
        train_step(scaled, optimizer, [(window[:, :-1], window[:, 1:])], 1, None,
                   before_update=lambda loss, norm, step=step: guard.decide(optimizer, loss, norm, step))
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}
    return guard.take(), sum(float(v.double().sum()) for v in full.values())


@pytest.mark.multirank
def test_every_rank_decides_alike_from_the_global_loss(tmp_path):
    """Under FSDP2 a spike in one rank's loss is skipped by both ranks (the loss is averaged over the ranks first): the
    shards stay one model."""
    from multirank import run_ranks

    (s0, v0), (s1, v1) = run_ranks(_guarded_ranks, [(), ()], tmp_path)
    assert s0 == s1 == "ok", (v0, v1)
    assert v0[0] == v1[0] == (1, 1, 0) and v0[1] == v1[1]


def test_a_non_finite_loss_or_norm_is_skipped_at_any_step_and_stays_out_of_the_window():
    from types import SimpleNamespace

    from smollm2.optim import SpikeGuard

    guard, optimizer = SpikeGuard(GUARD, torch.device("cpu")), SimpleNamespace()
    for step, (loss, norm) in enumerate([(1.0, 1.0), (float("nan"), 1.0), (1.1, float("inf")), (0.9, 1.1), (1.0, 0.9),
                                         (1.05, 1.0), (100.0, 1.0)], start=1):
        guard.decide(optimizer, torch.tensor(loss), torch.tensor(norm), step)
        assert float(optimizer.found_inf) == (step in (2, 3, 7)), step
    assert torch.isfinite(guard.window).all()
    assert guard.take() == (3, 3, 3)  # steps 2 and 3: spike_max_skips=2 in a row, ending at step 3

"""AdamW with decoupled weight decay on matrices and embeddings only (stepped on the local shards), and the learning-rate
schedule.

The schedule is a pure function of the step with its own horizon (`optim.decay_steps`), independent of `train.max_steps`:
phase 2 (5000 -> 5050) therefore continues the same curve, with no re-warmup and no jump.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from smollm2.config import OptimConfig, Schedule
from smollm2.errors import TrainingDiverged


class LocalAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose update runs on the local shards of FSDP2's DTensors.

    Parameters, param groups and state stay exactly torch's (the moments are DTensors like the parameters, so
    `state_dict`, DCP checkpoints and resharding across world sizes do not change); only the lists handed to the update
    (fused or foreach) hold `to_local()` views sharing the DTensors' storage. AdamW is elementwise, so the math is the
    same, bitwise, and the step skips DTensor dispatch: one sharding-propagation round per op and tensor on the host."""

    def _init_group(self, group, *lists):
        has_complex = super()._init_group(group, *lists)
        if not any(isinstance(p, DTensor) for p in lists[0]):  # plain tensors (world size 1 without FSDP2)
            return has_complex
        for tensors in lists:  # params, grads, exp_avgs, exp_avg_sqs, (max_exp_avg_sqs), state_steps
            for i, t in enumerate(tensors):
                if isinstance(t, DTensor):
                    tensors[i] = t.to_local()  # under the step's no_grad: the local tensor itself, no copy
        return has_complex


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():  # the tied table appears once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)  # biases and norms: no decay
    # None: auto = fused on CUDA; elsewhere torch's single-tensor loop, bitwise the foreach update and faster on CPU.
    # Fused on CPU is faster still but not bitwise the others (the bf16 CPU runs of tests/test_train_numerics.py sit at
    # their tolerance with it), so it is opt-in there (`optim.fused=true`). (docs/performance.md, "AdamW on CPU")
    fused = device.type == "cuda" or cfg.spike_guard if cfg.fused is None else cfg.fused  # the guard skips inside it
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return LocalAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused,
                      foreach=None if fused else device.type == "cuda")


class SpikeGuard:
    """optim.spike_guard: whether this step's update is applied (llm.c's -sl/-sg, OLMo-core's SkipStepAdamW), decided on
    the device with no host sync.

    A step is skipped when its loss (the mean over the ranks) or its gradient norm is above mean + z * std of the last
    `spike_window` accepted steps, once that many were accepted, or is not finite (at any step). The fused AdamW skips
    it whole on the device (its `found_inf`: parameters, moments and step count unchanged); the step's data is consumed
    all the same, and a skipped step does not enter the window. Every rank decides alike: both values are the same on
    every rank. The log step reads the counters (`take`): skips since the last line, in all, and whether
    `spike_max_skips` came in a row."""

    def __init__(self, cfg: OptimConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        zeros = lambda dtype: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
        self.window = torch.zeros(2, cfg.spike_window, dtype=torch.float64, device=device)  # losses; gradient norms
        self.accepted, self.streak, self.skipped = zeros(torch.int64), zeros(torch.int64), zeros(torch.int64)
        self.tripped_at = zeros(torch.int64)  # the step spike_max_skips in a row ended at (0: never)
        self.z = torch.tensor([cfg.spike_z_loss, cfg.spike_z_grad], dtype=torch.float64, device=device)
        self._reported = 0

    @torch.no_grad()
    def decide(self, optimizer: torch.optim.Optimizer, step_loss: torch.Tensor, grad_norm: torch.Tensor,
               step: int) -> None:
        """Before optimizer.step(): sets its `found_inf` to 1 for a step to skip, 0 otherwise."""
        loss = step_loss.detach().double()
        if dist.is_initialized() and dist.get_world_size() > 1:
            loss = loss.clone()
            dist.all_reduce(loss)  # the global mean: every rank decides alike
            loss /= dist.get_world_size()
        values = torch.stack([loss, grad_norm.detach().double().reshape(())])
        mean, std = self.window.mean(dim=1), self.window.std(dim=1)
        full = self.accepted >= self.cfg.spike_window
        # a NaN or infinite loss or norm is always skipped (it would poison the window and the weights), even early
        skip = ~torch.isfinite(values).all() | (full & ~(values <= mean + self.z * std).all())
        keep = ~skip
        slot = self.accepted % self.cfg.spike_window
        self.window[:, slot] = torch.where(keep, values, self.window[:, slot])
        self.accepted += keep.long()
        self.streak = (self.streak + 1) * skip.long()
        self.skipped += skip.long()
        trips = (self.streak >= self.cfg.spike_max_skips) & (self.tripped_at == 0)
        self.tripped_at = torch.where(trips, torch.full_like(self.tripped_at, step), self.tripped_at)
        optimizer.found_inf = skip.float().to(self.device)  # read by torch's fused Adam(W) step

    def take(self) -> tuple[int, int, int]:
        """(skipped since the last call, skipped in all, the step a run of spike_max_skips ended at or 0): a host sync."""
        total, tripped = int(self.skipped), int(self.tripped_at)
        new, self._reported = total - self._reported, total
        return new, total, tripped

    def stopped(self, tripped: int, outcome: str, kept: object) -> TrainingDiverged:
        """The error that ends a run after spike_max_skips skips in a row (ending at step `tripped`)."""
        return TrainingDiverged(f"{self.cfg.spike_max_skips} updates in a row skipped as spikes, by step {tripped}; "
                                f"{outcome}. The last good checkpoint is kept in {kept}")

    def state_dict(self) -> dict:
        return {"window": self.window.tolist(), "accepted": int(self.accepted), "streak": int(self.streak),
                "skipped": int(self.skipped), "tripped_at": int(self.tripped_at)}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's window (one of another window size, or none: a guard turned on at this resume, starts empty)."""
        if len(state.get("window", [[]])[0]) != self.cfg.spike_window:
            return
        self.window = torch.tensor(state["window"], dtype=torch.float64, device=self.device)
        for name in ("accepted", "streak", "skipped", "tripped_at"):
            setattr(self, name, torch.tensor(int(state[name]), dtype=torch.int64, device=self.device))
        self._reported = int(state["skipped"])


class LRSchedule:
    """lr(step) for the optimizer step that turns `step` completed steps into step + 1.

    linear warmup over `warmup_steps`, then cosine | wsd (warmup-stable-decay) | constant down to lr * min_lr_ratio at
    `decay_steps`, flat after that."""

    def __init__(self, cfg: OptimConfig):
        self.cfg = cfg
        self.changed: list[str] = []  # settings that differ from the checkpoint this run resumed from

    def lr_at(self, step: int) -> float:
        c = self.cfg
        peak, floor = c.lr, c.lr * c.min_lr_ratio
        if step < c.warmup_steps:
            return peak * (step + 1) / c.warmup_steps
        if c.schedule == Schedule.constant:
            return peak
        if c.schedule == Schedule.wsd:
            decay_start = c.decay_steps - int(c.wsd_decay_fraction * c.decay_steps)
            decay_start = max(decay_start, c.warmup_steps)
            if step < decay_start:
                return peak
            progress = min(1.0, (step - decay_start) / max(1, c.decay_steps - decay_start))
            return peak + (floor - peak) * progress
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.decay_steps - c.warmup_steps))
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        c = self.cfg
        return {"schedule": str(c.schedule), "lr": c.lr, "warmup_steps": c.warmup_steps, "decay_steps": c.decay_steps,
                "min_lr_ratio": c.min_lr_ratio, "wsd_decay_fraction": c.wsd_decay_fraction}

    def load_state_dict(self, saved: dict) -> None:
        """A checkpoint's settings do not replace this run's (the config decides the curve); what differs is kept in
        `changed` for the run to warn about: resuming under other settings makes the curve jump."""
        self.changed = self.changes_from(saved)

    def changes_from(self, saved: dict) -> list[str]:
        """Which schedule settings differ from a checkpoint's."""
        now = self.state_dict()
        return [f"optim.{k}: {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]

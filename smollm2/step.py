"""One optimizer step of training: the code `smollm2.train` runs and `python -m bench.step` times.

No host sync: the loss stays on the device (accumulated into `loss_sum`), and the gradient norm is returned as a tensor,
read only on log steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _local_and_copies(t: torch.Tensor, world: int) -> tuple[torch.Tensor, int]:
    """(this rank's part of `t`, how many ranks hold that same part). A DTensor is split over its Shard mesh dims and
    repeated over the others (HSDP's replicate dim): world size / product of the shard dims' sizes (its mesh spans the
    world). A plain tensor is the whole of it on every rank."""
    if not isinstance(t, DTensor):
        return t, world
    shards = 1
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            shards *= t.device_mesh.size(dim)
    return t.to_local(), world // shards


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float | None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (L2) on the local shards: one `_foreach_norm` over the local gradients; when the
    world is larger than 1, ONE all-reduce of their squares (a vector, one float per tensor: the reduction DTensor makes
    of the partial norms, so the result stays bitwise torch's; each part counted once across the ranks that hold it);
    the norm of the per-tensor norms; then the gradients scaled in place by min(1, max_norm / (norm + 1e-6)) (skipped
    without a `max_norm`: the factor would be 1). No DTensor dispatch per tensor. Bitwise torch's over DTensors on one
    mesh dim (tests/test_perf_local_shards.py; HSDP within 1e-6). Returns the total norm, a plain 0-d tensor."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    grads, copies = [], []
    for p in parameters:
        if p.grad is not None:
            local, n = _local_and_copies(p.grad, world)
            grads.append(local)
            copies.append(n)
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads, 2.0))  # one device (torch's own `.to(first_device)` is left out)
    if world > 1:  # as DTensor reduces the per-tensor partial norms: squares summed over the ranks, square roots
        squares = norms**2.0
        dist.all_reduce(squares, op=dist.ReduceOp.SUM)  # the one collective: a vector of one float per tensor
        if max(copies) > 1:  # HSDP replicas of a shard, or plain tensors: each counted once
            squares = squares / torch.tensor(copies, dtype=squares.dtype, device=squares.device)
        norms = squares**0.5
    total = torch.linalg.vector_norm(norms, 2.0)  # torch's exact reduction over the per-tensor norms
    if max_norm:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
    return total


@torch.no_grad()
def weights_finite(parameters) -> bool:
    """Collective: whether every parameter, on every rank (each its local shards), holds only finite values."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in parameters]
    checks = [torch.isfinite(t).all() for t in local if t.numel()]
    device = local[0].device if local else torch.device("cpu")
    finite = (torch.stack(checks).all() if checks else torch.ones((), dtype=torch.bool, device=device)).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def train_step(model, optimizer: torch.optim.Optimizer, micro_batches, accum: int, grad_clip: float | None,
               loss_sum: torch.Tensor | None = None, inspect_grads=None, before_update=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_accum micro-steps (gradients reduce-scatter only on the last one), clipping, the optimizer step.

    `micro_batches`: [(inputs, targets)] of this rank, or (inputs, targets, {"doc_ids": ..., "positions": ...}) where
    document masking has a micro-batch of several documents; `accum` divides each micro-batch's mean loss so that the gradient is
    the mean over the global batch (equal tokens per window). The detached losses are added in place to `loss_sum` (a new
    zero tensor if None), which is returned with the pre-clipping gradient norm. The LR is set by the caller beforehand.
    `inspect_grads(model)`, if given, sees the full step's gradients before clipping (the trainer's gradient flow, on
    log steps only). `before_update(step_loss, grad_norm)`, if given, runs between clipping and the update (the spike
    guard: this rank's loss of the step, summed over its micro-steps, and the pre-clipping norm)."""
    if loss_sum is None:
        loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    last = len(micro_batches) - 1
    step_loss = torch.zeros((), device=loss_sum.device) if before_update is not None else None
    sync = getattr(model, "set_requires_gradient_sync", None)
    for k, (inputs, targets, *documents) in enumerate(micro_batches):
        if sync is not None:  # FSDP2: gradients reduce only on the last micro-step
            sync(k == last)
        loss = model(inputs, targets, **(documents[0] if documents else {}))
        if accum > 1:  # (dividing by 1 is exact; skipping it saves an op and an autograd node per micro-step)
            loss = loss / accum
        loss.backward()
        loss_sum += loss.detach()
        if step_loss is not None:
            step_loss += loss.detach()
    if inspect_grads is not None:
        inspect_grads(model)
    grad_norm = clip_grad_norm(model.parameters(), grad_clip)
    if before_update is not None:
        before_update(step_loss, grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm

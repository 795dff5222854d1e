"""One optimizer step of training: the code `smollm2.train` runs and `python -m bench.step` times.

No host sync: the loss stays on the device (accumulated into `loss_sum`), and the gradient norm is returned as a tensor
(a DTensor under FSDP2), read only on log steps.
"""

from __future__ import annotations

import torch


def train_step(model, optimizer: torch.optim.Optimizer, micro_batches, accum: int, grad_clip: float | None,
               loss_sum: torch.Tensor | None = None, inspect_grads=None) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_accum micro-steps (gradients reduce-scatter only on the last one), clipping, the optimizer step.

    `micro_batches`: [(inputs, targets)] of this rank; `accum` divides each micro-batch's mean loss so that the gradient is
    the mean over the global batch (equal tokens per window). The detached losses are added in place to `loss_sum` (a new
    zero tensor if None), which is returned with the pre-clipping gradient norm. The LR is set by the caller beforehand.
    `inspect_grads(model)`, if given, sees the full step's gradients before clipping (the trainer's gradient flow, on
    log steps only)."""
    if loss_sum is None:
        loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    last = len(micro_batches) - 1
    for k, (inputs, targets) in enumerate(micro_batches):
        model.set_requires_gradient_sync(k == last)
        loss = model(inputs, targets) / accum
        loss.backward()
        loss_sum += loss.detach()
    if inspect_grads is not None:
        inspect_grads(model)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm

"""The validation loss over the fixed val windows: of the one dataset, or of each source of a mixture and their mix."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from smollm2.data import ValWindows
from smollm2.data.loader import documents_of
from smollm2.distributed import DistEnv

Documents = tuple[int | None, bool]


@torch.no_grad()
def _mean_loss(model, val: ValWindows, micro_batch: int, env: DistEnv, documents: Documents) -> float:
    """Mean loss over `val`. Every rank runs the same number of forwards (FSDP's all-gathers are collective); a rank with
    fewer windows repeats its last one with weight 0."""
    windows = val.rank_windows(env.rank, env.world_size)
    most = math.ceil(val.num_windows / env.world_size)
    n_batches = max(1, math.ceil(most / micro_batch))
    loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
    token_count = torch.zeros((), device=env.device, dtype=torch.float64)
    for b in range(n_batches):
        chunk = windows[b * micro_batch : (b + 1) * micro_batch]
        weight = 1.0
        if len(chunk) == 0:  # keep step with the other ranks
            chunk, weight = (windows[-1:] if len(windows) else val.rank_windows(0, 1)[:1]), 0.0
        docs = _documents(chunk[:, :-1], documents, env.device)
        chunk = chunk.to(env.device, non_blocking=True)
        loss = model(chunk[:, :-1], chunk[:, 1:], **docs)
        tokens = chunk[:, 1:].numel()
        loss_sum += loss.double() * tokens * weight
        token_count += tokens * weight
    totals = torch.stack([loss_sum, token_count])
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def _documents(inputs: torch.Tensor, documents: Documents, device) -> dict[str, torch.Tensor]:
    """What a masked training batch carries, for these val inputs (nothing where each window is one document)."""
    return {name: t.to(device) for name, t in documents_of(inputs.numpy(), *documents).items()}


def validation_loss(model, val: dict[str, ValWindows], weights: dict[str, float] | None, micro_batch: int,
                    env: DistEnv, documents: Documents = (None, False)) -> dict:
    """{"val_loss", "val_ppl", "windows"}: of the one dataset (`val` = {"": ...}), or of a mixture, where each source
    adds "eval/<name>/val_loss" and the mixed loss is the sources' losses averaged by `weights` (the stage's).
    `documents` (EOS id, position reset): with document masking, the val windows are masked as training's are."""
    model.eval()
    try:
        losses = {name: _mean_loss(model, windows, micro_batch, env, documents) for name, windows in val.items()}
    finally:
        model.train()
    if "" in losses:
        loss, record = losses[""], {}
    else:
        drawn = {name: w for name, w in (weights or {}).items() if w > 0 and name in losses}
        loss = sum(w * losses[name] for name, w in drawn.items()) / sum(drawn.values())
        record = {f"eval/{name}/val_loss": value for name, value in losses.items()}
    windows = sum(v.num_windows for v in val.values())
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "windows": windows, **record}

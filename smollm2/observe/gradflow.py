"""Gradient flow: per-group gradient norms and histograms, correct under FSDP2 sharding.

A sharded gradient's norm is not its local shard's: every rank sums the squares of its own shards per group, one
all-reduce adds them up, and the square root comes after. Histograms are binned on each rank over a range the ranks
agree on (an all-reduce MAX), and the bin counts are summed: no full tensor is gathered anywhere. Both run only on log
steps; on the other steps nothing here runs at all.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

_BLOCK = re.compile(r"blocks\.(\d+)\.(?:.*\.)?(attn|mlp|norm)\w*\.")


def group_of(name: str) -> str:
    """The group of a parameter name: `embed` (the token embedding, and the LM head when tied), `block_NN/attn|mlp|norm`
    (both of a block's norms are `norm`), `final_norm`, `head` (an untied LM head); wrapper prefixes (compile,
    checkpointing) are ignored."""
    name = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
    if name.startswith("embed."):
        return "embed"
    match = _BLOCK.search(name)
    if match:
        return f"block_{int(match.group(1)):02d}/{match.group(2)}"
    if name.startswith("norm."):
        return "final_norm"
    if name.startswith("head."):  # an untied LM head
        return "head"
    return "other"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def counted_here(t: torch.Tensor) -> bool:
    """Whether this rank's part of `t` is counted in a sum over all ranks that must count every element once: a plain
    (replicated) tensor on rank 0 only; a DTensor's shard on the ranks at position 0 of every mesh dimension it is
    replicated over (HSDP: the replicas of a shard hold the same values)."""
    if not hasattr(t, "to_local"):
        return not dist.is_initialized() or dist.get_rank() == 0
    coordinate = t.device_mesh.get_coordinate() or []
    return all(c == 0 for c, placement in zip(coordinate, t.placements) if placement.is_replicate())


def _groups(model: torch.nn.Module, what: str) -> dict[str, list[tuple[torch.Tensor, bool]]]:
    """group -> [(local tensor, counted_here)]: `what` is "grad" or "param"; see `counted_here`."""
    groups: dict[str, list[tuple[torch.Tensor, bool]]] = {}
    for name, p in model.named_parameters():
        t = p.grad if what == "grad" else p.detach()
        if t is None:
            continue
        groups.setdefault(group_of(name), []).append((_local(t), counted_here(t)))
    return groups


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def _per_group(groups, names, reduce_parts, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """[len(names)]: reduce_parts(the local tensors this rank counts) per group, then all-reduced with `op`."""
    device = next(iter(groups.values()))[0][0].device
    out = torch.zeros(len(names), device=device, dtype=torch.float32)
    for i, name in enumerate(names):
        parts = [t.detach().float() for t, counted in groups[name] if counted and t.numel()]
        if parts:
            out[i] = reduce_parts(parts)
    return _all_reduce(out, op)


@torch.no_grad()
def group_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """{group: L2 norm of the group's full gradient}, the same on every rank (collective: every rank calls it). The
    squares add up to the total gradient norm's square. Call it after backward and before the gradients are cleared."""
    groups = _groups(model, "grad")
    names = sorted(groups)
    if not names:
        return {}
    squares = _per_group(groups, names, lambda parts: torch.stack(torch._foreach_norm(parts)).pow(2).sum())
    return dict(zip(names, squares.sqrt().tolist()))  # the one host sync


def _abs_max(parts: list[torch.Tensor]) -> torch.Tensor:
    """max |x| over the tensors, from one min/max pass each: `aminmax` is vectorized and allocates nothing, where
    `t.abs().max()` writes a full-size temporary and is slower (docs/performance.md, "Gradient flow")."""
    return torch.stack([torch.stack(torch.aminmax(t)).abs().max() for t in parts]).max()


@torch.no_grad()
def group_histograms(model: torch.nn.Module, what: str = "grad", bins: int = 64) -> dict[str, tuple[list, list]]:
    """{group: (counts, bin edges)} of every value of the group's full gradients (`what="grad"`) or parameters
    ("param"), over [-max|x|, max|x|]. Collective. Cost: one pass over the local shards per group (torch.histc)."""
    groups = _groups(model, what)
    names = sorted(groups)
    if not names:
        return {}
    ranges = _per_group(groups, names, _abs_max, dist.ReduceOp.MAX).clamp_min(1e-12)
    device = ranges.device
    counts = torch.zeros(len(names), bins, device=device, dtype=torch.float32)
    for i, name in enumerate(names):
        r = float(ranges[i])
        for t, counted in groups[name]:
            if counted and t.numel():
                counts[i] += torch.histc(t.detach().float().flatten(), bins=bins, min=-r, max=r)
    counts = _all_reduce(counts).cpu()
    out = {}
    for i, name in enumerate(names):
        r = float(ranges[i])
        edges = torch.linspace(-r, r, bins + 1).tolist()
        out[name] = (counts[i].tolist(), edges)
    return out


class GradientFlow:
    """What the trainer records about gradients on log steps: the per-group norms every time, and histograms of what
    `watch` names ("grad", "param") every `every` log steps. `hook(True)` is handed to `train_step` on log steps."""

    def __init__(self, watch: list[str], every: int):
        self.watch, self.every, self.log_steps = watch, every, 0
        self.norms: dict[str, float] = {}
        self.histograms: dict[str, dict] = {}

    def hook(self, log_step: bool):
        return self._inspect if log_step else None

    def _inspect(self, model: torch.nn.Module) -> None:
        self.norms = group_grad_norms(model)
        if self.watch and self.log_steps % self.every == 0:
            self.histograms = {what: group_histograms(model, what) for what in self.watch}
        self.log_steps += 1

    def take(self) -> tuple[dict[str, float], dict[str, dict]]:
        norms, histograms = self.norms, self.histograms
        self.norms, self.histograms = {}, {}
        return norms, histograms

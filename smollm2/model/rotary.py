"""Rotary position embeddings (rotate-half, GPT-NeoX / Llama convention): the cos/sin tables, the rotation, and the
per-row positions of left-padded batches."""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for positions [T]; [B, 1, T, head_dim] for per-row positions [B, T] (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq  # [..., T, head_dim/2]: for [T], exactly torch.outer
    angles = angles if positions.dim() == 1 else angles.unsqueeze(1)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotates each (i, i + D/2) pair by its position's angle (GPT-NeoX / Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def left_padding(left_pad: torch.Tensor, start_pos: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row RoPE positions [B, T] and attention mask [B, 1, T, start_pos + T] for the slots start_pos.. of left-padded
    rows (batched generation): row b's first left_pad[b] slots are padding; its real tokens count positions from 0 and
    never see the padding. A padding query sees only itself, so no softmax row is empty (NaN)."""
    slots = torch.arange(start_pos + T, device=left_pad.device)
    query = slots[start_pos:, None]  # [T, 1]
    real = (slots >= left_pad[:, None])[:, None, :]  # [B, 1, keys]
    mask = (real | (slots == query)) & (slots <= query)  # [B, T, keys]
    return (query.squeeze(1) - left_pad[:, None]).clamp(min=0), mask.unsqueeze(1)

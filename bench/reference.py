"""The reference: the same architecture written the way a nanoGPT user would, deliberately plain.

nn.Linear layers, default `F.scaled_dot_product_attention`, `F.cross_entropy` over the full logits, bf16 autocast, fused AdamW
(on CUDA), gradient clipping, `torch.compile` of the whole model, no FSDP. It imports nothing from `smollm2`: the benchmark's
ratio compares our training step against this, so it must not share any of our optimized code paths.

Same model as `smollm2.model.SmolLM` (GPT-2-small with rotate-half RoPE, tied head, vocab padded to a multiple of 128 with the
padded logits set to -inf); `load_smollm2_state` copies our weights in so the two can be checked against each other.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 50258
    padded_vocab: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_mlp: int = 3072
    block_size: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head, self.n_embd = config.n_head, config.n_embd

    def forward(self, x, cos, sin):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = (q * cos + rotate_half(q) * sin).to(v.dtype)
        k = (k * cos + rotate_half(k) * sin).to(v.dtype)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_mlp)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(config.n_mlp, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        head_dim = config.n_embd // config.n_head
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(config.block_size).float(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        T = idx.size(1)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x, cos, sin)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        logits[..., self.config.vocab_size:] = float("-inf")  # padded vocab entries are never predicted
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-100)

    def configure_optimizers(self, weight_decay, learning_rate, betas, eps, device_type, fused=None):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        nodecay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": nodecay, "weight_decay": 0.0}]
        if fused is None:  # nanoGPT's rule: fused where available, on CUDA
            fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **({"fused": True} if fused else {}))

    @torch.no_grad()
    def load_smollm2_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a `smollm2.model.SmolLM` state dict (full tensors) into this model."""
        names = {"embed.weight": "transformer.wte.weight", "norm.weight": "transformer.ln_f.weight",
                 "norm.bias": "transformer.ln_f.bias"}
        parts = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
                 "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
        own = self.state_dict()
        for name, value in state.items():
            if name == "head.weight":
                continue
            if name in names:
                target = names[name]
            else:
                _, layer, rest = name.split(".", 2)
                module, leaf = rest.rsplit(".", 1)
                target = f"transformer.h.{layer}.{parts[module]}.{leaf}"
            own[target].copy_(value)


class ReferenceTrainer:
    """nanoGPT's train.py inner loop: autocast forward, backward per micro-batch, clip, step, zero_grad."""

    def __init__(self, config: GPTConfig, device: torch.device, *, dtype: str = "bf16", compile: bool = True,
                 lr: float = 5e-4, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8, grad_clip: float = 1.0,
                 fused: bool | None = None):
        self.raw_model = GPT(config).to(device)
        self.optimizer = self.raw_model.configure_optimizers(weight_decay, lr, betas, eps, device.type, fused)
        self.model = torch.compile(self.raw_model) if compile else self.raw_model
        self.grad_clip = grad_clip
        self.device_type = device.type
        self.ptdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]

    def step(self, micro_batches) -> torch.Tensor:
        accum = len(micro_batches)
        total = torch.zeros((), device=micro_batches[0][0].device)
        for x, y in micro_batches:
            with torch.autocast(device_type=self.device_type, dtype=self.ptdtype, enabled=self.ptdtype != torch.float32):
                loss = self.model(x, y) / accum
            loss.backward()
            total += loss.detach()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

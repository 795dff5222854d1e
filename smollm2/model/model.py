"""SmolLM2-135: GPT-2-small with rotary position embeddings.

    pre-norm blocks: x + Attn(LN(x)), x + MLP(LN(x)); fused QKV with bias; RoPE (rotate-half); causal attention;
    GELU MLP with biases; final LayerNorm; LM head tied to the token embedding; no learned positions.

The embedding table is stored padded to a multiple of 128 rows (50,258 -> 50,304) for even FSDP shards and fast matmuls;
the padded logits are set to -inf, so they never carry probability mass in the loss and are never sampled.

`python -m smollm2.model --config configs/smollm2_135.yaml` prints the parameter table (`parameter_table`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from smollm2.config import AttentionBackend, ModelConfig
from smollm2.model.loss import linear_cross_entropy
from smollm2.model.rotary import apply_rope, left_padding, rope_cos_sin

try:  # optional: flash-attn has no wheels; SDPA already picks flash/cuDNN kernels on GPUs
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA build
    flash_attn_func = None


def padded_vocab_size(cfg: ModelConfig) -> int:
    return math.ceil(cfg.vocab_size / cfg.pad_vocab_multiple) * cfg.pad_vocab_multiple


# ------------------------------------------------------------------------------------------------------------- kv cache


class KVCache:
    """Keys and values of every layer for incremental decoding: [B, H, max_len, D] per layer, filled left to right.

    Buffers are allocated on first use with the keys' dtype and device (bf16 under FSDP mixed precision)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int):
        self.shape = (batch, cfg.n_head, max_len, cfg.d_model // cfg.n_head)
        self.keys: list[torch.Tensor | None] = [None] * cfg.n_layer
        self.values: list[torch.Tensor | None] = [None] * cfg.n_layer
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {end}")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros(self.shape)
            self.values[layer] = v.new_zeros(self.shape)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# --------------------------------------------------------------------------------------------------------------- blocks


def naive_attention(q, k, v, causal_offset: int | None):
    """Reference attention: explicit masked softmax. `causal_offset` = position of q[0] among the keys (None: no mask)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if causal_offset is not None:
        tq, tk = q.shape[2], k.shape[2]
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=causal_offset)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.head_dim, self.layer = cfg.n_head, cfg.d_model // cfg.n_head, layer
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=True)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=True)
        self.backend = cfg.attention

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0, mask: torch.Tensor | None = None):
        B, T, C = x.shape
        # 3 x [B, H, T, D]; split + transpose (not one permute of [B, T, 3, H, D]: the same values, and a cheaper
        # compiled backward for RoPE and the split: docs/performance.md, "q, k, v: split + transpose")
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, start_pos, k, v)
        y = self._attend(q, k, v, start_pos, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _attend(self, q, k, v, start_pos: int, mask: torch.Tensor | None = None):
        if mask is not None:  # left-padded rows (batched generation): only SDPA takes a per-row mask
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        backend = self.backend
        if backend == AttentionBackend.auto:
            usable = flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            backend = AttentionBackend.flash_attn if usable else AttentionBackend.sdpa
        if backend == AttentionBackend.naive:
            return naive_attention(q, k, v, start_pos)
        if backend == AttentionBackend.flash_attn:
            if flash_attn_func is None:
                raise RuntimeError("model.attention=flash_attn but the flash_attn package is not importable")
            # flash-attn aligns the causal mask to the bottom-right corner, which is what a KV-cache decode needs.
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return out.transpose(1, 2)
        tq, tk = q.shape[2], k.shape[2]
        if tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if tq == 1:  # one new token sees every cached position
            return F.scaled_dot_product_attention(q, k, v)
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=start_pos)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=True)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=True)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """`recompute`: None, or how training calls the block's math under activation checkpointing, e.g.
    `partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)` (chosen by smollm2.parallelize). It is applied
    inside forward, so a compiled block traces the recompute itself (wrapping a compiled block in an eager checkpoint
    would recompute through a different graph)."""

    def __init__(self, cfg: ModelConfig, layer: int, recompute: Callable | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=True)
        self.attn = Attention(cfg, layer)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=True)
        self.mlp = MLP(cfg)
        self.recompute = recompute

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0, mask: torch.Tensor | None = None):
        if self.recompute is not None and kv_cache is None and torch.is_grad_enabled():
            return self.recompute(self._forward, x, cos, sin)
        return self._forward(x, cos, sin, kv_cache, start_pos, mask)

    def _forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0, mask: torch.Tensor | None = None):
        x = x + self.attn(self.norm1(x), cos, sin, kv_cache, start_pos, mask)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------------------------- model


class SmolLM(nn.Module):
    """`recompute`: each block's activation-checkpointing wrapper in training (see `Block`); `compiled_loss`: run the
    fused loss's per-chunk softmax + gradient through torch.compile. Both are chosen by smollm2.parallelize."""

    def __init__(self, cfg: ModelConfig, *, recompute: Callable | None = None, compiled_loss: bool = False):
        super().__init__()
        self.cfg = cfg
        self.padded_vocab = padded_vocab_size(cfg)
        self.embed = nn.Embedding(self.padded_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, recompute) for i in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=True)
        self.head = nn.Linear(cfg.d_model, self.padded_vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.compiled_loss = compiled_loss
        # RoPE tables (fp32, positions 0..max_seq_len-1; buffers, not saved), sliced by forward. Computed in forward inside
        # a compiled graph, they were recomputed per block in the backward (docs/performance.md, "RoPE tables as buffers").
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._fill_rope_tables()

    def _fill_rope_tables(self) -> None:
        positions = torch.arange(self.cfg.max_seq_len, device=self.embed.weight.device)
        self.rope_cos, self.rope_sin = rope_cos_sin(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta)

    def forward(self, idx, targets=None, *, kv_cache: KVCache | None = None, start_pos: int = 0,
                left_pad: torch.Tensor | None = None):
        """idx [B, T] -> logits [B, T, padded_vocab] (padded columns -inf), or the mean cross-entropy if targets given.
        `left_pad` [B]: row b starts with that many padding slots (batched prompts of different lengths; see
        `left_padding`); `start_pos` counts slots, padding included."""
        T, end, mask, head_dim = idx.shape[1], start_pos + idx.shape[1], None, self.cfg.d_model // self.cfg.n_head
        # fp32 tables whatever dtype the weights run in (apply_rope rotates in fp32): in bf16, cos/sin would keep 8
        # significant bits. Whatever wraps the blocks must hand them over unconverted.
        if left_pad is not None:  # per-row positions
            positions, mask = left_padding(left_pad.to(idx.device), start_pos, T)
            cos, sin = rope_cos_sin(positions, head_dim, self.cfg.rope_theta)
        elif end <= self.rope_cos.shape[0] and self.rope_cos.dtype == torch.float32:
            cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
        else:  # past the tables, or a model cast to another dtype
            cos, sin = rope_cos_sin(torch.arange(start_pos, end, device=idx.device), head_dim, self.cfg.rope_theta)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, start_pos, mask)
        x = self.norm(x)
        if targets is not None:
            return self.loss(x, targets)
        return self.logits(x)

    def logits(self, h):
        logits = self.head(h)
        logits[..., self.cfg.vocab_size :] = float("-inf")  # storage padding: never predicted, never sampled
        return logits

    def loss(self, h, targets):
        """Mean cross-entropy (fp32) over the targets that are not -100, through the fused, chunked head + loss
        (`linear_cross_entropy`): the [B*T, vocab] logits are never held whole, nor kept for the backward."""
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.head.weight, targets.reshape(-1), self.cfg.vocab_size,
                                    compiled=self.compiled_loss)

    # ------------------------------------------------------------------------------------------------ initialization

    def materialize(self, device) -> SmolLM:
        """Allocate storage for a model built on the meta device (before `init_weights` or a checkpoint load).

        A plain `to_empty` gives the LM head its own tensor; re-tie it (FSDP2 already keeps the tie)."""
        self.to_empty(device=device)
        if self.head.weight is not self.embed.weight:
            self.head.weight = self.embed.weight
        self._fill_rope_tables()  # buffers too are empty after to_empty
        return self

    @torch.no_grad()
    def init_weights(self, seed: int = 0, copy_into: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """GPT-2 init, by module type: Linear and Embedding weights N(0, 0.02), the residual projections (attention and
        MLP output) N(0, 0.02/sqrt(2*n_layer)); biases 0; LayerNorm 1/0; the padded embedding rows 0.

        Each parameter is drawn in full from a CPU generator seeded by (seed, parameter index), then copied in with
        `copy_into(param, full)` (default: a plain copy; smollm2.parallelize passes one that copies a sharded parameter's
        local shard): the same seed gives the same model on the meta device or not, sharded or not, at any world size."""
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layer)
        copy_into = copy_into or (lambda param, full: param.copy_(full))
        index = {id(param): i for i, param in enumerate(self.parameters())}  # the tied table appears once
        done: set[int] = set()

        def fill(param: torch.Tensor, draw: Callable[[torch.Tensor, torch.Generator], object]) -> None:
            if id(param) in done:  # the tied head after the embedding; a projection after its residual scaling
                return
            done.add(id(param))
            full = torch.zeros(param.shape, dtype=torch.float32)
            draw(full, torch.Generator().manual_seed(seed * 1_000_003 + index[id(param)]))
            copy_into(param, full)

        zeros = lambda full, g: None  # noqa: E731 - already zero
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                fill(module.weight, lambda full, g: full.fill_(1.0))
                fill(module.bias, zeros)
            elif isinstance(module, nn.Embedding):
                fill(module.weight, lambda full, g: full.normal_(0.0, std, generator=g)[self.cfg.vocab_size :].zero_())
            elif isinstance(module, (Attention, MLP)):  # output projections feed the residual stream: scaled down
                fill(module.proj.weight, lambda full, g: full.normal_(0.0, resid_std, generator=g))
            elif isinstance(module, nn.Linear):
                fill(module.weight, lambda full, g: full.normal_(0.0, std, generator=g))
                if module.bias is not None:
                    fill(module.bias, zeros)
        assert len(done) == len(index), "a parameter of a module type init_weights does not know"

    def num_params(self, logical: bool = True) -> int:
        """Parameter count (the tied table counted once); `logical` counts the 50,258-row vocab, not the padded storage."""
        total = sum(p.numel() for p in self.parameters())
        if logical:
            total -= (self.padded_vocab - self.cfg.vocab_size) * self.cfg.d_model
        return total


# ------------------------------------------------------------------------------------------------------ parameter table


def parameter_table(cfg: ModelConfig) -> list[tuple[str, int]]:
    """The spec's breakdown, counted from the modules themselves (built on the meta device)."""
    with torch.device("meta"):
        model = SmolLM(cfg)
    block = model.blocks[0]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    embed_logical = cfg.vocab_size * cfg.d_model
    rows = [
        ("token embeddings (tied with LM head)", embed_logical),
        ("per layer", count(block)),
        ("  attention QKV (weight + bias)", count(block.attn.qkv)),
        ("  attention out-proj (weight + bias)", count(block.attn.proj)),
        ("  MLP up (weight + bias)", count(block.mlp.fc)),
        ("  MLP down (weight + bias)", count(block.mlp.proj)),
        ("  norms (2 x LayerNorm)", count(block.norm1) + count(block.norm2)),
        (f"all {cfg.n_layer} layers", count(model.blocks)),
        ("final norm", count(model.norm)),
        ("total", model.num_params(logical=True)),
        (f"total as stored (vocab padded to {model.padded_vocab})", model.num_params(logical=False)),
    ]
    assert rows[-2][1] == embed_logical + count(model.blocks) + count(model.norm)
    return rows

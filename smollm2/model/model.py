"""SmolLM2-135: GPT-2-small with rotary position embeddings; and, by its model.* options, the Llama-style SmolLM2-135M.

    pre-norm blocks: x + Attn(LN(x)), x + MLP(LN(x)); fused QKV with bias; RoPE (rotate-half); causal attention;
    GELU MLP with biases; final LayerNorm; LM head tied to the token embedding; no learned positions.

The options (defaults = the model above, bit for bit): `n_kv_head` (grouped-query attention: the fused QKV holds n_head
query and n_kv_head key and value heads; the KV cache only the latter), `norm` (layernorm | rmsnorm), `mlp` (gelu |
swiglu: gate and up fused in one `fc` matmul, [gate; up]), `bias` (every linear layer and LayerNorm), `tie_embeddings`.
configs/smollm2_135m_llama.yaml sets them to SmolLM2-135M's: 30 x 576, 9 heads / 3 KV heads, SwiGLU, RMSNorm, no biases.
`document_masking` (training): attention stays inside each document of a packed window (`doc_ids`; attention.py).

The embedding table is stored padded to a multiple of 128 rows (50,258 -> 50,304) for even FSDP shards and fast matmuls;
the padded logits are set to -inf, so they never carry probability mass in the loss and are never sampled.

`python -m smollm2.model --config configs/smollm2_135.yaml` prints the parameter table (`parameter_table`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from smollm2.config import AttentionBackend, Mlp, ModelConfig, Norm
from smollm2.model.attention import AttentionPlan, attend, attention_plan, flash_attn_func
from smollm2.model.loss import linear_cross_entropy
from smollm2.model.rotary import apply_rope, left_padding, rope_cos_sin


def padded_vocab_size(cfg: ModelConfig) -> int:
    return math.ceil(cfg.vocab_size / cfg.pad_vocab_multiple) * cfg.pad_vocab_multiple


# ------------------------------------------------------------------------------------------------------------- kv cache


class KVCache:
    """Keys and values of every layer for incremental decoding: [B, n_kv_head, max_len, D] per layer, filled left to right.

    Buffers are allocated on first use with the keys' dtype and device (bf16 under FSDP mixed precision)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int):
        self.shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
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


def naive_attention(q, k, v, causal_offset: int | None, mask: torch.Tensor | None = None):
    """Reference attention: explicit masked softmax. `causal_offset` = position of q[0] among the keys (None: no mask);
    `mask` [B, 1, Tq, Tk] (True = may attend) instead, e.g. a document mask. Fewer key/value heads than query heads (GQA):
    each serves its consecutive group of query heads."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif causal_offset is not None:
        tq, tk = q.shape[2], k.shape[2]
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=causal_offset)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.layer = cfg.n_head, cfg.kv_heads, cfg.head_dim, layer
        self.widths = (cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim)  # q, k, v
        self.qkv = nn.Linear(cfg.d_model, sum(self.widths), bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.backend = cfg.attention
        # SDPA shares each key/value head among its group of query heads itself (no copies of k and v)
        self.sdpa = partial(F.scaled_dot_product_attention, enable_gqa=True) if cfg.kv_heads != cfg.n_head else \
            F.scaled_dot_product_attention

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0, mask: torch.Tensor | None = None,
                plan: AttentionPlan | None = None):
        B, T, C = x.shape
        # [B, H, T, D] and 2 x [B, H_kv, T, D]; split + transpose (not one permute of [B, T, 3, H, D]: the same values,
        # and a cheaper compiled backward for RoPE and the split: docs/performance.md, "q, k, v: split + transpose")
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(self.widths, dim=2))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, start_pos, k, v)
        if plan is not None:  # training: documents, or flex's causal block mask (SmolLM.forward, once for every block)
            y = attend(q, k, v, plan, self.sdpa, naive_attention)
        else:
            y = self._attend(q, k, v, start_pos, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _attend(self, q, k, v, start_pos: int, mask: torch.Tensor | None = None):
        if mask is not None:  # left-padded rows (batched generation): only SDPA takes a per-row mask
            return self.sdpa(q, k, v, attn_mask=mask)
        backend = self.backend
        if backend == AttentionBackend.auto:
            usable = flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            backend = AttentionBackend.flash_attn if usable else AttentionBackend.sdpa
        if backend == AttentionBackend.naive:
            return naive_attention(q, k, v, start_pos)
        if backend == AttentionBackend.flex:  # here only with a KV cache (generation): a block mask per decode step
            backend = AttentionBackend.sdpa  # and length would cost more than it saves; SDPA computes the same
        if backend == AttentionBackend.flash_attn:
            if flash_attn_func is None:
                raise RuntimeError("model.attention=flash_attn but the flash_attn package is not importable")
            # flash-attn aligns the causal mask to the bottom-right corner, which is what a KV-cache decode needs.
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return out.transpose(1, 2)
        tq, tk = q.shape[2], k.shape[2]
        if tq == tk:
            return self.sdpa(q, k, v, is_causal=True)
        if tq == 1:  # one new token sees every cached position
            return self.sdpa(q, k, v)
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=start_pos)
        return self.sdpa(q, k, v, attn_mask=allowed)


class MLP(nn.Module):
    """GELU: proj(gelu(fc(x))). SwiGLU: `fc` holds gate and up ([gate; up], one matmul), proj(silu(gate) * up)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == Mlp.swiglu
        self.fc = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.d_mlp, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.fc(x).chunk(2, dim=-1)
            return self.proj(F.silu(gate) * up)
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == Norm.rmsnorm:
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    """`recompute`: None, or how training calls the block's math under activation checkpointing, e.g.
    `partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)` (chosen by smollm2.parallelize). It is applied
    inside forward, so a compiled block traces the recompute itself (wrapping a compiled block in an eager checkpoint
    would recompute through a different graph)."""

    def __init__(self, cfg: ModelConfig, layer: int, recompute: Callable | None = None):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.recompute = recompute

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0, mask: torch.Tensor | None = None,
                plan: AttentionPlan | None = None):
        if self.recompute is not None and kv_cache is None and torch.is_grad_enabled():
            return self.recompute(self._forward, x, cos, sin, None, 0, mask, plan)
        return self._forward(x, cos, sin, kv_cache, start_pos, mask, plan)

    def _forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0, mask: torch.Tensor | None = None,
                 plan: AttentionPlan | None = None):
        x = x + self.attn(self.norm1(x), cos, sin, kv_cache, start_pos, mask, plan)
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
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, self.padded_vocab, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.compiled_loss = compiled_loss
        # RoPE tables (fp32, positions 0..max_seq_len-1; buffers, not saved), sliced by forward. Computed in forward inside
        # a compiled graph, they were recomputed per block in the backward (docs/performance.md, "RoPE tables as buffers").
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._fill_rope_tables()

    def _fill_rope_tables(self) -> None:
        positions = torch.arange(self.cfg.max_seq_len, device=self.embed.weight.device)
        self.rope_cos, self.rope_sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)

    def forward(self, idx, targets=None, *, kv_cache: KVCache | None = None, start_pos: int = 0,
                left_pad: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None):
        """idx [B, T] -> logits [B, T, padded_vocab] (padded columns -inf), or the mean cross-entropy if targets given.
        `left_pad` [B]: row b starts with that many padding slots (batched prompts of different lengths; see
        `left_padding`); `start_pos` counts slots, padding included.
        Training on packed documents (attention.py): `doc_ids` [B, T] (each position's document in its row) keeps
        attention causal and inside each document; `positions` [B, T] (None: 0..T-1) are the per-row RoPE positions."""
        if (doc_ids is not None or positions is not None) and (kv_cache is not None or left_pad is not None):
            raise ValueError("doc_ids and positions are for training windows; generation (kv_cache, left_pad) takes neither")
        for name, given in (("doc_ids", doc_ids), ("positions", positions)):
            if given is not None and given.shape != idx.shape:
                raise ValueError(f"{name} has shape {tuple(given.shape)}; the input ids have {tuple(idx.shape)}")
        cos, sin, mask = self._rope(idx, start_pos, left_pad, positions)
        x = self.embed(idx)
        plan = None  # built once, for every block; not on the plain path (the builder is not compiled: a graph break)
        if kv_cache is None and left_pad is None and (doc_ids is not None or self.cfg.attention == AttentionBackend.flex):
            plan = attention_plan(self.cfg, doc_ids, idx.shape[1], idx.device, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, start_pos, mask, plan)
        x = self.norm(x)
        if targets is not None:
            return self.loss(x, targets)
        return self.logits(x)

    def _rope(self, idx, start_pos: int, left_pad: torch.Tensor | None, positions: torch.Tensor | None):
        """cos, sin ([T, D], or [B, 1, T, D] for per-row positions) and the left-padding mask (or None)."""
        T, end, head_dim = idx.shape[1], start_pos + idx.shape[1], self.cfg.head_dim
        # fp32 tables whatever dtype the weights run in (apply_rope rotates in fp32): in bf16, cos/sin would keep 8
        # significant bits. Whatever wraps the blocks must hand them over unconverted.
        tables = end <= self.rope_cos.shape[0] and self.rope_cos.dtype == torch.float32
        if left_pad is not None:  # per-row positions
            positions, mask = left_padding(left_pad.to(idx.device), start_pos, T)
            return *rope_cos_sin(positions, head_dim, self.cfg.rope_theta), mask
        if positions is not None:  # documents' positions (each < T: they restart within the window): rows of the tables
            if tables:
                return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1), None
            return *rope_cos_sin(positions, head_dim, self.cfg.rope_theta), None
        if tables:
            return self.rope_cos[start_pos:end], self.rope_sin[start_pos:end], None
        # past the tables, or a model cast to another dtype
        return *rope_cos_sin(torch.arange(start_pos, end, device=idx.device), head_dim, self.cfg.rope_theta), None

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
        if self.cfg.tie_embeddings and self.head.weight is not self.embed.weight:
            self.head.weight = self.embed.weight
        self._fill_rope_tables()  # buffers too are empty after to_empty
        return self

    @torch.no_grad()
    def init_weights(self, seed: int = 0, copy_into: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        """GPT-2 init, by module type: Linear and Embedding weights N(0, init_std), the residual projections (attention
        and MLP output) N(0, init_std/sqrt(2*n_layer)); biases 0; LayerNorm and RMSNorm 1 (bias 0); the padded rows of
        the embedding (and of an untied head) 0.

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
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                fill(module.weight, lambda full, g: full.fill_(1.0))
                if getattr(module, "bias", None) is not None:
                    fill(module.bias, zeros)
            elif isinstance(module, nn.Embedding) or module is self.head:  # the head: untied (tied, it is done)
                fill(module.weight, lambda full, g: full.normal_(0.0, std, generator=g)[self.cfg.vocab_size :].zero_())
            elif isinstance(module, (Attention, MLP)):  # output projections feed the residual stream: scaled down
                fill(module.proj.weight, lambda full, g: full.normal_(0.0, resid_std, generator=g))
                if module.proj.bias is not None:
                    fill(module.proj.bias, zeros)
            elif isinstance(module, nn.Linear):
                fill(module.weight, lambda full, g: full.normal_(0.0, std, generator=g))
                if module.bias is not None:
                    fill(module.bias, zeros)
        assert len(done) == len(index), "a parameter of a module type init_weights does not know"

    def num_params(self, logical: bool = True) -> int:
        """Parameter count (a tied table counted once); `logical` counts the vocab's rows (50,258), not the padded storage."""
        total = sum(p.numel() for p in self.parameters())
        if logical:
            tables = 1 if self.cfg.tie_embeddings else 2
            total -= tables * (self.padded_vocab - self.cfg.vocab_size) * self.cfg.d_model
        return total

    def flops_params(self) -> int:
        """The N of the 6N FLOPs per token: every parameter but an untied embedding table (a lookup, no matmul; tied, it
        is the head's matmul)."""
        untied_embedding = 0 if self.cfg.tie_embeddings else self.cfg.vocab_size * self.cfg.d_model
        return self.num_params() - untied_embedding


# ------------------------------------------------------------------------------------------------------ parameter table


def parameter_table(cfg: ModelConfig) -> list[tuple[str, int]]:
    """The breakdown, counted from the modules themselves (built on the meta device)."""
    with torch.device("meta"):
        model = SmolLM(cfg)
    block = model.blocks[0]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    embed_logical = cfg.vocab_size * cfg.d_model
    parts = " (weight + bias)" if cfg.bias else " (weight)"
    gqa = f", {cfg.kv_heads} KV heads" if cfg.kv_heads != cfg.n_head else ""
    norm = "LayerNorm" if cfg.norm == Norm.layernorm else "RMSNorm"
    up = "MLP gate + up" if cfg.mlp == Mlp.swiglu else "MLP up"
    rows = [
        ("token embeddings (tied with LM head)" if cfg.tie_embeddings else "token embeddings", embed_logical),
        ("per layer", count(block)),
        (f"  attention QKV{parts[:-1]}{gqa})" if gqa else f"  attention QKV{parts}", count(block.attn.qkv)),
        (f"  attention out-proj{parts}", count(block.attn.proj)),
        (f"  {up}{parts}", count(block.mlp.fc)),
        (f"  MLP down{parts}", count(block.mlp.proj)),
        (f"  norms (2 x {norm})", count(block.norm1) + count(block.norm2)),
        (f"all {cfg.n_layer} layers", count(model.blocks)),
        ("final norm", count(model.norm)),
    ]
    head = 0 if cfg.tie_embeddings else embed_logical
    if head:
        rows.append(("LM head (untied)", head))
    rows += [
        ("total", model.num_params(logical=True)),
        (f"total as stored (vocab padded to {model.padded_vocab})", model.num_params(logical=False)),
    ]
    assert rows[-2][1] == embed_logical + count(model.blocks) + count(model.norm) + head
    return rows

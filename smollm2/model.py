"""SmolLM2-135: GPT-2-small with rotary position embeddings.

    pre-norm blocks: x + Attn(LN(x)), x + MLP(LN(x)); fused QKV with bias; RoPE (rotate-half); causal attention;
    GELU MLP with biases; final LayerNorm; LM head tied to the token embedding; no learned positions.

The embedding table is stored padded to a multiple of 128 rows (50,258 -> 50,304) for even FSDP shards and fast matmuls;
the padded logits are set to -inf, so they never carry probability mass in the loss and are never sampled.

`python -m smollm2.model --config configs/smollm2_135.yaml` prints the parameter table.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from smollm2.config import ModelConfig, load_config

try:  # optional: flash-attn has no wheels; SDPA already picks flash/cuDNN kernels on GPUs
    from flash_attn import flash_attn_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA build
    flash_attn_func = None


def padded_vocab_size(cfg: ModelConfig) -> int:
    return math.ceil(cfg.vocab_size / cfg.pad_vocab_multiple) * cfg.pad_vocab_multiple


# -------------------------------------------------------------------------------------------------------------- rotary


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim] for the given positions (rotate-half layout: the two halves share frequencies)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = torch.outer(positions.float(), inv_freq)  # [T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotates each (i, i + D/2) pair by its position's angle (GPT-NeoX / Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


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

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, start_pos, k, v)
        y = self._attend(q, k, v, start_pos)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _attend(self, q, k, v, start_pos: int):
        backend = self.backend
        if backend == "auto":
            usable = flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            backend = "flash_attn" if usable else "sdpa"
        if backend == "naive":
            return naive_attention(q, k, v, start_pos)
        if backend == "flash_attn":
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
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=True)
        self.attn = Attention(cfg, layer)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=True)
        self.mlp = MLP(cfg)
        # Activation checkpointing in training: None, or a wrapper such as `partial(torch.utils.checkpoint.checkpoint,
        # ...)` (set by smollm2.distributed.build_model). It is applied inside forward, so a compiled block traces the
        # checkpoint itself (wrapping a compiled block in an eager checkpoint recomputes through a different graph).
        self.checkpoint = None

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0):
        if self.checkpoint is not None and kv_cache is None and torch.is_grad_enabled():
            return self.checkpoint(self._forward, x, cos, sin)
        return self._forward(x, cos, sin, kv_cache, start_pos)

    def _forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0):
        x = x + self.attn(self.norm1(x), cos, sin, kv_cache, start_pos)
        return x + self.mlp(self.norm2(x))


# ------------------------------------------------------------------------------------------------------ head + loss

# Logits per chunk (rows x padded vocab), rounded down to a power-of-two row count. CPU: 2**25 (512 rows of the 50,304
# vocab, 128 MiB in fp32). CUDA: 2**28 (4,096 rows): on an H200, B=8 x T=2048 through the head + loss, forward and
# backward, took 8.4 ms with a 1.55 GiB peak, against 18.4 ms (0.54 GiB) with 512-row chunks, and 7.7 ms (1.79 GiB) for
# compiled F.cross_entropy over the full logits; fewer chunks also mean fewer host-side launches (bench/NOTES.md).
LOSS_CHUNK_ELEMENTS = 2**25
LOSS_CHUNK_ELEMENTS_CUDA = 2**28


def _ce_chunk_eager(logits, targets, valid, vocab: int, need_grad: bool):
    """One chunk: (sum of CE over valid rows, d(sum CE)/d logits in the logits' dtype or None). In place, few passes."""
    dtype = logits.dtype
    logits = logits.float()
    logits[:, vocab:] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1)
    del logits
    safe_t = torch.where(valid, targets, 0).unsqueeze(1)
    loss = -(logp.gather(1, safe_t).squeeze(1) * valid).sum()
    if not need_grad:
        return loss, None
    probs = logp.exp_()  # softmax - onehot; rows with ignored targets are masked by the caller
    probs.scatter_add_(1, safe_t, torch.full(safe_t.shape, -1.0, device=probs.device))
    return loss, probs.to(dtype)


def _ce_chunk_functional(logits, targets, valid, vocab: int):
    """The same as `_ce_chunk_eager` with gradient, written for torch.compile (one fused read of the logits)."""
    dtype = logits.dtype
    columns = torch.arange(logits.shape[1], device=logits.device)
    logits = logits.float().masked_fill(columns >= vocab, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    safe_t = torch.where(valid, targets, 0).unsqueeze(1)
    loss = -(logp.gather(1, safe_t).squeeze(1) * valid).sum()
    return loss, (logp.exp() - (columns == safe_t).float()).to(dtype)


_compiled_chunk = None


def _ce_chunk_compiled(logits, targets, valid, vocab: int):
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_ce_chunk_functional, dynamic=False)
    return _compiled_chunk(logits, targets, valid, vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i @ W.T, t_i), the gradients computed chunk by chunk in the forward (they need only the chunk's
    softmax) and scaled by the incoming gradient in the backward. Logit columns >= `vocab` are padding: -inf, so they
    carry no probability mass and get no gradient. Per chunk: logits in the weight's dtype (bf16 under mixed precision,
    like the plain path), softmax and loss in fp32, the two gradient matmuls in the weight's dtype, dW summed in fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab: int, need_grad: bool, compiled: bool):
        n = h.shape[0]
        elements = LOSS_CHUNK_ELEMENTS_CUDA if h.is_cuda else LOSS_CHUNK_ELEMENTS
        rows = min(n, 1 << max(0, (elements // weight.shape[0]).bit_length() - 1))  # a power of two
        valid = targets != -100
        count = valid.sum().clamp(min=1).float()
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = None
        for start in range(0, n, rows):
            h_c, t_c, v_c = h[start : start + rows], targets[start : start + rows], valid[start : start + rows]
            logits = h_c @ weight.t()
            if compiled and need_grad:
                loss_c, g = _ce_chunk_compiled(logits, t_c, v_c, vocab)
            else:
                loss_c, g = _ce_chunk_eager(logits, t_c, v_c, vocab, need_grad)
            del logits
            loss += loss_c
            if need_grad:  # d(sum CE)/d logits = softmax - onehot on valid rows; the 1/count comes after the matmuls
                grad_h[start : start + rows] = (g @ weight) * (v_c.float() / count).unsqueeze(1)
                part = g.t() @ (h_c * v_c.unsqueeze(1).to(h_c.dtype))  # 0/1 row mask: exact in any dtype
                grad_w = part.float() if grad_w is None else grad_w.add_(part)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w.div_(count).to(weight.dtype))
        return loss / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None, None


def linear_cross_entropy(h, weight, targets, vocab: int, compiled: bool = False):
    """Mean cross-entropy of the logits `h @ weight.T` (columns >= vocab masked) over targets != -100. h [N, C].

    `compiled`: run each chunk's softmax/gradient through torch.compile (one fused kernel; for GPUs)."""
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(h, weight, targets, vocab, need_grad, compiled)


# ---------------------------------------------------------------------------------------------------------------- model


class SmolLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.padded_vocab = padded_vocab_size(cfg)
        self.embed = nn.Embedding(self.padded_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=True)
        self.head = nn.Linear(cfg.d_model, self.padded_vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.compile_loss = False  # compile the loss's per-chunk softmax (set with the blocks' compile by build_model)

    def forward(self, idx, targets=None, *, kv_cache: KVCache | None = None, start_pos: int = 0):
        """idx [B, T] -> logits [B, T, padded_vocab] (padded columns -inf), or the mean cross-entropy if targets given."""
        T = idx.shape[1]
        positions = torch.arange(start_pos, start_pos + T, device=idx.device)
        cos, sin = rope_cos_sin(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, start_pos)
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
                                    compiled=self.compile_loss)

    # ------------------------------------------------------------------------------------------------ initialization

    def materialize(self, device) -> SmolLM:
        """Allocate storage for a model built on the meta device (before `init_weights` or a checkpoint load).

        A plain `to_empty` gives the LM head its own tensor; re-tie it (FSDP2 already keeps the tie)."""
        self.to_empty(device=device)
        if self.head.weight is not self.embed.weight:
            self.head.weight = self.embed.weight
        return self

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 init (std 0.02; residual projections 0.02/sqrt(2*n_layer); biases 0; norms 1/0).

        Each parameter is drawn in full from a CPU generator seeded by (seed, parameter index), then the local shard is
        copied in: the same seed gives the same model on the meta device or not, sharded or not, at any world size."""
        std = self.cfg.init_std
        resid_std = std / math.sqrt(2 * self.cfg.n_layer)
        for index, (name, param) in enumerate(self.named_parameters()):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            full = torch.zeros(param.shape, dtype=torch.float32)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                full.fill_(1.0)
            elif name.endswith(".bias"):
                pass  # biases start at 0
            elif name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                full.normal_(0.0, resid_std, generator=generator)
            else:  # embedding (= head) and the qkv / fc matrices
                full.normal_(0.0, std, generator=generator)
                if name == "embed.weight":
                    full[self.cfg.vocab_size :] = 0.0  # padding rows: never looked up, never predicted
            _copy_full_into(param, full)

    def num_params(self, logical: bool = True) -> int:
        """Parameter count (the tied table counted once); `logical` counts the 50,258-row vocab, not the padded storage."""
        total = sum(p.numel() for p in self.parameters())
        if logical:
            total -= (self.padded_vocab - self.cfg.vocab_size) * self.cfg.d_model
        return total


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        try:  # src_data_rank=None: every rank holds the same full tensor, so split locally, no communication
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        except TypeError:  # torch < 2.7
            shard = distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm2.model", description="Print the parameter table.")
    parser.add_argument("--config", default="configs/smollm2_135.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides).model
    print(f"{'component':<48} {'parameters':>14}")
    for name, n in parameter_table(cfg):
        print(f"{name:<48} {n:>14,}")
    return 0


if __name__ == "__main__":
    from smollm2.errors import run_cli

    run_cli(main)

"""Document masking: in a packed training window, each position attends causally and only within its own document.

The loader passes, per micro-batch, `doc_ids` [B, T] (the document index of each position within its row: nondecreasing,
0 at every row's start; a document ends with its EOS) and, with data.position_reset, `positions` [B, T] (RoPE positions
restarting at 0 at each document). `SmolLM.forward` builds one `AttentionPlan` per forward (`attention_plan`: the mask,
block mask or sequence boundaries, never per layer) and hands it to every block. The kernel follows `model.attention`:

    kernel              model.attention                              needs
    "flash_attn varlen" flash_attn; auto on CUDA in bf16/fp16        flash-attn importable, CUDA, bf16/fp16
    "flex"              flex; auto on CUDA without flash-attn        CUDA + Triton to train (CPU: forward only, eager)
    "sdpa + mask"       sdpa; auto on CPU or without either above    -
    "naive + mask"      naive (the reference the tests compare to)   -

`attention_kernel(cfg, device, dtype)` names the kernel before any forward (the trainer prints it at start-up) and raises
a one-line ConfigError for a combination that cannot run; the forward goes through the same choice.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch

from smollm2.config import AttentionBackend, ModelConfig
from smollm2.errors import ConfigError

try:  # optional: flash-attn has no wheels; SDPA already picks flash/cuDNN kernels on GPUs
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA build
    flash_attn_func = flash_attn_varlen_func = None

FLASH_VARLEN, FLEX, SDPA_MASK, NAIVE_MASK = "flash_attn varlen", "flex", "sdpa + mask", "naive + mask"
HALF = (torch.float16, torch.bfloat16)


class AttentionPlan(NamedTuple):
    """How every block of one forward attends: the kernel and what it reads (a NamedTuple: compiled blocks and
    activation checkpointing take it as an argument like any other)."""

    kernel: str
    mask: torch.Tensor | None = None  # sdpa / naive + mask: bool [B, 1, T, T], True = may attend
    block_mask: object | None = None  # flex: a BlockMask (document & causal, or causal alone)
    cu_seqlens: torch.Tensor | None = None  # flash_attn varlen: int32 document starts in the B*T flattened tokens, + B*T
    max_seqlen: int = 0  # flash_attn varlen: T, an upper bound of every document's length


# ------------------------------------------------------------------------------------------------------- the choice


def _flex_problem(device: torch.device, training: bool) -> str | None:
    """Why FlexAttention cannot run here, or None."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "needs Triton (torch.compile's GPU backend), which is not importable"
    if device.type == "cpu" and not training:  # eager flex: a forward over the materialized scores (evaluation)
        return None
    # torch 2.13 on CPU: "FlexAttention does not support backward on CPU", compiled or eager (measured)
    return f"cannot train on {device.type}: torch {torch.__version__.split('+')[0]}'s FlexAttention has no backward there"


def _masked_kernel(backend: AttentionBackend, device: torch.device, dtype: torch.dtype, training: bool) -> str:
    cuda = device.type == "cuda"
    if backend == AttentionBackend.auto:
        if cuda and flash_attn_varlen_func is not None and dtype in HALF:
            return FLASH_VARLEN
        # flex skips the blocks the mask rules out; SDPA with a mask computes every block of the T x T scores
        return FLEX if cuda and _flex_problem(device, training) is None else SDPA_MASK
    if backend == AttentionBackend.flash_attn:
        if not cuda:
            raise ConfigError(f"model.attention=flash_attn runs on CUDA only, not {device.type}; use model.attention=auto")
        if flash_attn_varlen_func is None:
            raise ConfigError("model.attention=flash_attn with model.document_masking needs flash_attn_varlen_func, but "
                              "the flash-attn package is not importable; install it or use model.attention=auto")
        if dtype not in HALF:
            raise ConfigError(f"model.attention=flash_attn needs bf16 or fp16 activations, not {dtype} (train.dtype=bf16), "
                              "or use model.attention=auto")
        return FLASH_VARLEN
    if backend == AttentionBackend.flex:
        problem = _flex_problem(device, training)
        if problem:
            raise ConfigError(f"model.attention=flex {problem}; use model.attention=auto or sdpa")
        return FLEX
    return NAIVE_MASK if backend == AttentionBackend.naive else SDPA_MASK


def attention_kernel(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, *, training: bool = True) -> str:
    """The attention kernel of the training forward on `device` with activations in `dtype` (bf16 under mixed precision):
    with model.document_masking, the masked one ("flash_attn varlen", "flex", "sdpa + mask", "naive + mask"); without it,
    the plain causal one ("flash_attn", "flex", "sdpa", "naive"). Raises a one-line ConfigError for a combination that
    cannot run (flash_attn off CUDA, without the package or in fp32; flex where it cannot train). Needs no forward."""
    device = torch.device(device)
    if cfg.document_masking:
        return _masked_kernel(cfg.attention, device, dtype, training)
    backend = cfg.attention
    if backend == AttentionBackend.auto:
        usable = flash_attn_func is not None and device.type == "cuda" and dtype in HALF
        return "flash_attn" if usable else "sdpa"
    if backend == AttentionBackend.flash_attn:
        if device.type != "cuda" or flash_attn_func is None:
            raise ConfigError("model.attention=flash_attn needs CUDA and the flash-attn package; use model.attention=auto")
        return "flash_attn"
    if backend == AttentionBackend.flex:
        problem = _flex_problem(device, training)
        if problem:
            raise ConfigError(f"model.attention=flex {problem}; use model.attention=auto or sdpa")
    return str(backend)


# --------------------------------------------------------------------------------------------------------- the plan


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: query t may see key s <= t of its own document (never empty: it sees itself)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)


def varlen_cu_seqlens(doc_ids: torch.Tensor) -> torch.Tensor:
    """flash-attn's sequence boundaries for the rows flattened to B*T tokens (each row's documents become sequences):
    int32 [n + 1], the document starts then B*T, padded to a power of two of sequences with empty ones (B*T repeated).

    One host sync (`nonzero`): flash-attn's grid has one entry per sequence, so their number must be known; padding to
    B*T sequences would launch millions of empty blocks. The power of two keeps a compiled block to a few shapes."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = starts.flatten().nonzero().flatten().to(torch.int32)
    n = first.numel()
    padded = 1 << (n - 1).bit_length()
    return torch.cat([first, first.new_full((padded + 1 - n,), B * T)])


def _document_mask_mod(doc_ids: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (q_idx >= kv_idx)

    return mask_mod


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=8)
def _causal_block_mask(T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal_mask_mod, None, None, T, T, device=device)


def attention_plan(cfg: ModelConfig, doc_ids: torch.Tensor | None, T: int, device: torch.device,
                   dtype: torch.dtype) -> AttentionPlan | None:
    """The plan of one training forward (None: the blocks' plain causal path): with `doc_ids`, the masked kernel's
    inputs; without, a causal block mask when model.attention=flex (the other backends need nothing). Eager, once per
    forward: flash-attn's host sync and the BlockMask stay out of compiled graphs."""
    return _eager_plan()(cfg, doc_ids, T, device, dtype)


@functools.cache
def _eager_plan():
    # torch.compiler.disable imports torch._dynamo: at the first plan, not at import (generate and export never need it)
    return torch.compiler.disable(_plan)


def _plan(cfg: ModelConfig, doc_ids: torch.Tensor | None, T: int, device: torch.device,
          dtype: torch.dtype) -> AttentionPlan | None:
    training = torch.is_grad_enabled()
    if doc_ids is None:
        if cfg.attention != AttentionBackend.flex:
            return None
        problem = _flex_problem(device, training)
        if problem:
            raise ConfigError(f"model.attention=flex {problem}; use model.attention=auto or sdpa")
        return AttentionPlan(FLEX, block_mask=_causal_block_mask(T, device))
    kernel = _masked_kernel(cfg.attention, device, dtype, training)
    if kernel == FLASH_VARLEN:
        return AttentionPlan(kernel, cu_seqlens=varlen_cu_seqlens(doc_ids), max_seqlen=T)
    if kernel == FLEX:
        from torch.nn.attention.flex_attention import create_block_mask

        block_mask = create_block_mask(_document_mask_mod(doc_ids), doc_ids.shape[0], None, T, T, device=device)
        return AttentionPlan(kernel, block_mask=block_mask)
    return AttentionPlan(kernel, mask=document_mask(doc_ids))


# ------------------------------------------------------------------------------------------------------ the kernels


@functools.cache
def _compiled_flex():
    """flex_attention through torch.compile: the fused kernels that skip the masked-out blocks (eager flex materializes
    the whole score matrix). Inside an already compiled block it is traced into that graph."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, block_mask):
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    from torch.nn.attention.flex_attention import flex_attention

    # CPU, forward only (_flex_problem): eager; compiling it takes ~20 s per shape for a path that cannot train
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _flash_varlen(q, k, v, plan: AttentionPlan):
    B, H, T, D = q.shape
    # [B, H, T, D] -> [B*T, H, D]: every row's documents become sequences of one flattened batch
    flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v)]
    out = flash_attn_varlen_func(*flat, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen, causal=True)
    return out.view(B, T, H, D).transpose(1, 2)


def attend(q, k, v, plan: AttentionPlan, sdpa, naive):
    """q [B, H, T, D], k and v [B, H_kv, T, D] -> [B, H, T, D] by the plan's kernel (`sdpa` shares the KV heads among
    their query heads, `naive` is model.naive_attention, the reference)."""
    if plan.kernel == FLASH_VARLEN:
        return _flash_varlen(q, k, v, plan)
    if plan.kernel == FLEX:
        return _flex(q, k, v, plan.block_mask)
    if plan.kernel == NAIVE_MASK:
        return naive(q, k, v, None, plan.mask)
    return sdpa(q, k, v, attn_mask=plan.mask)

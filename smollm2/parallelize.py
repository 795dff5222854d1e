"""Build the training model: meta device -> recompute (activation checkpointing) -> compile -> FSDP2 `fully_shard` ->
materialize -> initialize. The model file knows none of this; here is every decision about how it runs.

One code path for every world size: a single process is a one-rank group, so checkpointing and resuming never branch on
"distributed or not". The exception is FSDP2's own host work: at world size 1 with `train.fsdp_wrap=auto` the model is
not wrapped (a shard would be the whole tensor, and FSDP2's per-parameter copy-in, copy-out and gradient bookkeeping are
host work: docs/performance.md, "FSDP2 at world size 1"); bf16 is then the same parameter cast FSDP2 makes
(`_bf16_params_forward`), bitwise. DCP checkpoints hold the same global tensors either way and reshard as before.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from smollm2.config import Config, Dtype, FsdpWrap, Recompute
from smollm2.distributed import DistEnv
from smollm2.errors import ConfigError
from smollm2.model import SmolLM, attention_kernel


def compile_enabled(setting: bool | None, device: torch.device) -> bool:
    """train.compile: None (auto) compiles on CUDA only; on CPU compile time outweighs what it saves at our sizes."""
    return device.type == "cuda" if setting is None else setting


def compile_options(cpp_wrapper: bool | None, device: torch.device) -> dict:
    """torch.compile's options for the model: train.cpp_wrapper (None = auto: on for CPU, where it is measured)."""
    return {"cpp_wrapper": device.type == "cpu" if cpp_wrapper is None else cpp_wrapper}


def _selective_policy():
    """Save the matmul and attention outputs, recompute the cheap elementwise ops (norms, GELU, RoPE)."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        save.add(aten._scaled_dot_product_flash_attention_for_cpu.default)
    # document masking's GPU kernels: flash-attn's own ops (registered as torch ops by flash-attn >= 2.6), where loaded
    flash = getattr(torch.ops, "flash_attn", None)
    for name in ("_flash_attn_forward", "_flash_attn_varlen_forward"):
        if flash is not None and hasattr(flash, name):
            save.add(getattr(flash, name).default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def recompute_fn(mode: Recompute) -> Callable | None:
    """How each block's math is called in training: directly, or under (full | selective) activation checkpointing."""
    if mode == Recompute.none:
        return None
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if mode == Recompute.full:
        return partial(checkpoint, use_reentrant=False)
    return partial(checkpoint, use_reentrant=False,
                   context_fn=partial(create_selective_checkpoint_contexts, _selective_policy()))


def fsdp_units(setting: FsdpWrap, world_size: int) -> FsdpWrap | None:
    """block | root | None (no FSDP2): at world size 1 every shard is the whole tensor, so FSDP2 only adds host work."""
    if setting == FsdpWrap.auto:
        return None if world_size == 1 else FsdpWrap.block
    return FsdpWrap(setting)


def _bf16_params_forward(model: SmolLM, forward: Callable) -> Callable:
    """Without FSDP2, what its MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) computes at world size 1: each
    call casts every fp32 parameter to bf16 once (the tied table once for both uses) and runs the forward on the casts;
    autograd casts the bf16 gradients back onto the fp32 parameters and accumulates them in fp32 (FSDP2's fp32 reduce of
    one rank, and its fp32 accumulation without sync). Bitwise the root unit's losses, gradients and updates."""
    slots = [(module, name) for module in model.modules() for name, p in module._parameters.items() if p is not None]

    def call(*args, **kwargs):
        originals = [module._parameters[name] for module, name in slots]
        casts: dict[int, torch.Tensor] = {}
        try:
            for (module, name), param in zip(slots, originals):
                if id(param) not in casts:
                    casts[id(param)] = param.to(torch.bfloat16)
                module._parameters[name] = casts[id(param)]
            return forward(*args, **kwargs)
        finally:
            for (module, name), param in zip(slots, originals):
                module._parameters[name] = param

    return call


def _check_dp_shard(env: DistEnv, dp_shard: int) -> int:
    shard = dp_shard or env.world_size
    if shard > env.world_size or env.world_size % shard:
        raise ConfigError(f"train.dp_shard={dp_shard} must divide the world size ({env.world_size}): ranks per shard group "
                          "(e.g. the GPUs of one node), or 0 for all ranks")
    return shard


def data_parallel_mesh(env: DistEnv, dp_shard: int):
    """The device mesh FSDP2 shards over: 1-D (all ranks, plain FSDP) or, with train.dp_shard < world size, 2-D
    (replicate x shard: HSDP). Rank r sits in shard group r // dp_shard at position r % dp_shard, so consecutive ranks (one
    node's GPUs under torchrun and srun) share a shard group and only the gradient all-reduce crosses nodes. The data
    order does not depend on it: the loader slices the global batch by global rank either way."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = _check_dp_shard(env, dp_shard)
    if shard == env.world_size:
        return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(env.device.type, (env.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into a parameter: its local shard if it is a DTensor, all of it otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        try:  # src_data_rank=None: every rank holds the same full tensor, so split locally, no communication
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        except TypeError:  # torch < 2.7
            shard = distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


def masked_attention(cfg: Config, device: torch.device) -> str | None:
    """The kernel document masking trains with here (None without masking), in the activations' dtype; a one-line
    ConfigError for a combination that cannot run, masked or not (smollm2/model/attention.py)."""
    kernel = attention_kernel(cfg.model, device, torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32)
    return kernel if cfg.model.document_masking else None


def build_model(cfg: Config, env: DistEnv, *, init_seed: int | None = None) -> SmolLM:
    """The training model: sharded, mixed precision, recomputing and compiled as configured, weights initialized."""
    compiled = compile_enabled(cfg.train.compile, env.device)
    units = fsdp_units(cfg.train.fsdp_wrap, env.world_size)
    _check_dp_shard(env, cfg.train.dp_shard)
    if units is None and cfg.train.dtype == Dtype.bf16 and cfg.train.reduce_dtype == Dtype.bf16:
        units = FsdpWrap.root  # FSDP2 would accumulate un-synced gradients in bf16: keep its numerics
    # What is compiled follows the FSDP units: per-block units compile per block (FSDP2's hooks run between them); one
    # root unit or none compiles the model's forward as one graph (FSDP2's hooks and the bf16 parameter cast stay outside
    # it; the loss chunk is traced into it, not compiled on its own). At world size 1 that is one graph where 12 cost more
    # host time (docs/performance.md, "One compiled graph or one per block").
    per_block = compiled and units == FsdpWrap.block
    with torch.device("meta"):  # the recompute runs inside each block's forward, so a compiled block traces it
        model = SmolLM(cfg.model, recompute=recompute_fn(cfg.train.activation_checkpointing), compiled_loss=per_block)
    options = compile_options(cfg.train.cpp_wrapper, env.device)
    if per_block:
        for block in model.blocks:  # per-block compile keeps parameter names (and so checkpoints) unchanged
            block.compile(options=options)
    elif compiled:  # the bound method, not Module.compile(): that would trace __call__, hooks included
        model.forward = torch.compile(model.forward, options=options)
    # cast_forward_inputs=False: by default each FSDP unit casts its forward's float inputs to param_dtype. The blocks'
    # inputs are the residual stream (already bf16: the embedding runs on bf16 weights) and the RoPE cos/sin tables,
    # which must stay fp32 (bf16 keeps 8 significant bits). Per-block units would round the tables to bf16; with one
    # root unit (its inputs are token ids) nothing is cast. Not casting makes both layouts, and so every world size,
    # compute the same math. Nothing else reads the flag: parameters are still all-gathered in bf16, gradients reduced
    # in train.reduce_dtype (fp32 by default).
    if cfg.train.dtype == Dtype.bf16:
        reduce = torch.bfloat16 if cfg.train.reduce_dtype == Dtype.bf16 else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce, cast_forward_inputs=False)
    else:
        mp = MixedPrecisionPolicy()
    if units is not None:
        shard = partial(fully_shard, mp_policy=mp, mesh=data_parallel_mesh(env, cfg.train.dp_shard))
        if units == FsdpWrap.block:
            for block in model.blocks:
                shard(block, reshard_after_forward=cfg.train.reshard_after_forward)
        # Root unit: token embedding, final norm and the tied head must live in one FSDP group.
        # It is all-gathered for the forward's last step anyway, so keep it unsharded until backward.
        shard(model, reshard_after_forward=False)
    elif cfg.train.dtype == Dtype.bf16:
        model.forward = _bf16_params_forward(model, model.forward)
    model.materialize(env.device)
    model.init_weights(cfg.train.seed if init_seed is None else init_seed, copy_into=copy_full_into)
    return model

"""Process group, device, and the parallelized model: meta-device build -> activation checkpointing -> compile ->
FSDP2 `fully_shard` per block + root -> materialize -> initialize.

One code path for every world size: `python -m smollm2.train` alone runs as a one-rank process group, so sharding,
checkpointing and resuming never branch on "distributed or not". NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from smollm2.config import Config
from smollm2.errors import ConfigError
from smollm2.model import SmolLM


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_pref: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    """Join (or, for a plain `python -m`, create) the process group and pick this rank's device."""
    if "RANK" not in os.environ:  # not under torchrun/srun: a process group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available; use train.device=cpu (or auto)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # gloo for the few CPU-side collectives (checkpoint planning, objects)
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistEnv(rank, world_size, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _compile_enabled(setting: str, device: torch.device) -> bool:
    setting = str(setting).lower()
    return device.type == "cuda" if setting == "auto" else setting == "true"


def _selective_policy():
    """Save the matmul and attention outputs, recompute the cheap elementwise ops (norms, GELU, RoPE)."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        save.add(aten._scaled_dot_product_flash_attention_for_cpu.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpoint_fn(mode: str):
    """How each block is called in the forward: directly, or under (full | selective) activation checkpointing."""
    if mode == "none":
        return None
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    if mode == "full":
        return partial(checkpoint, use_reentrant=False)
    return partial(checkpoint, use_reentrant=False,
                   context_fn=partial(create_selective_checkpoint_contexts, _selective_policy()))


def fsdp_wrap(setting: str, world_size: int) -> str:
    """block | root: at world size 1 every shard is the whole tensor, so per-block units only add host-side hooks."""
    if setting == "auto":
        return "root" if world_size == 1 else "block"
    return setting


def build_model(cfg: Config, env: DistEnv, *, init_seed: int | None = None) -> SmolLM:
    """The training model: sharded, mixed precision, checkpointed and compiled as configured, weights initialized."""
    with torch.device("meta"):
        model = SmolLM(cfg.model)
    for block in model.blocks:  # inside each block's forward, so compile traces it (parameter names unchanged)
        block.checkpoint = checkpoint_fn(cfg.train.activation_checkpointing)
    if _compile_enabled(cfg.train.compile, env.device):
        for block in model.blocks:  # per-block compile keeps parameter names (and so checkpoints) unchanged
            block.compile()
        model.compile_loss = True  # the fused loss's per-chunk softmax + gradient as one kernel
    if cfg.train.dtype == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    shard = partial(fully_shard, mp_policy=mp)
    if fsdp_wrap(cfg.train.fsdp_wrap, env.world_size) == "block":
        for block in model.blocks:
            shard(block, reshard_after_forward=cfg.train.reshard_after_forward)
    # Root unit: token embedding, final norm and the tied head must live in one FSDP group.
    # It is all-gathered for the forward's last step anyway, so keep it unsharded until backward.
    shard(model, reshard_after_forward=False)
    model.materialize(env.device)
    model.init_weights(cfg.train.seed if init_seed is None else init_seed)
    return model

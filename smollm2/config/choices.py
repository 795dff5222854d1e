"""The values config keys take: the fixed sets (`Choice` and its kinds) and the checks every section's `check` uses.

The sections themselves are in smollm2/config/schema.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from enum import Enum
from typing import Any

from smollm2.errors import ConfigError


class Choice(str, Enum):
    """A config value from a fixed set. Members are their strings (`Dtype.bf16 == "bf16"`) and print as them; YAML
    and `key=value` overrides give them by name, and anything else is rejected naming the key and the choices."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class AttentionBackend(Choice):
    auto = "auto"  # flash_attn if importable on CUDA, else SDPA (which already picks flash/cuDNN kernels on GPUs)
    sdpa = "sdpa"
    flash_attn = "flash_attn"
    naive = "naive"  # explicit masked softmax: the reference the tests compare against
    flex = "flex"  # FlexAttention (compiled), a causal or document block mask


class Norm(Choice):
    layernorm = "layernorm"  # with a bias when model.bias (GPT-2)
    rmsnorm = "rmsnorm"  # Llama / SmolLM2


class Mlp(Choice):
    gelu = "gelu"  # d_model -> d_mlp -> d_model, GELU (tanh): GPT-2
    swiglu = "swiglu"  # down(silu(gate(x)) * up(x)), gate and up fused in one matmul: Llama / SmolLM2


class Dtype(Choice):
    bf16 = "bf16"  # bf16 compute and communication, fp32 master weights and gradient reduction
    fp32 = "fp32"


class Recompute(Choice):
    """Activation checkpointing: which activations each block recomputes in the backward instead of keeping."""

    none = "none"
    full = "full"  # everything: the least memory
    selective = "selective"  # keep matmul and attention outputs, recompute the cheap elementwise ops


class Device(Choice):
    auto = "auto"  # cuda if available
    cuda = "cuda"
    cpu = "cpu"


class FsdpWrap(Choice):
    """FSDP2 units. The checkpoint format is the same for all three."""

    auto = "auto"  # no FSDP2 at world size 1 (sharding saves nothing there, and its host work slows a host-bound step:
    # docs/performance.md, "FSDP2 at world size 1"): the plain model with the same bf16 casts, bitwise; block otherwise
    block = "block"  # each block, plus a root unit for embedding, final norm and tied head
    root = "root"  # one unit: one all-gather per micro-step, one reduce-scatter per step, fewest host-side hooks


class Schedule(Choice):
    cosine = "cosine"
    wsd = "wsd"  # warmup-stable-decay
    constant = "constant"


class WandbMode(Choice):
    auto = "auto"  # online when logged in (WANDB_API_KEY or a netrc entry), otherwise offline; never a prompt
    disabled = "disabled"  # nothing is imported from wandb
    offline = "offline"  # <run_dir>/wandb/offline-run-*, `wandb sync` later; no API key
    online = "online"


class WandbWatch(Choice):
    """WANDB_WATCH: histograms of the full gradients / parameters every `histogram_interval` log steps."""

    off = "off"
    gradients = "gradients"
    parameters = "parameters"
    all = "all"


# WANDB_LOG_MODEL's values: checkpoints as `model` artifacts (references to the checkpoint directory, not copies).
# "checkpoint" (or "true") = every checkpoint, "end" = the run's final one, "false" = none.
LOG_MODEL_CHOICES = {"false": "false", "true": "checkpoint", "checkpoint": "checkpoint", "end": "end"}


def _require(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {key} {reason}")


def _positive(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value > 0, prefix + name, f"must be positive (got {value})")


def _non_negative(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value >= 0, prefix + name, f"must be >= 0 (got {value})")


def _all_finite(section: Any, prefix: str) -> None:
    """No setting is meant to be infinite or NaN (`train.dist_timeout_min=inf`, `generate.temperature=inf` would only fail
    later, mid-run): each float of the section and of its subsections."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _all_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            _require(math.isfinite(value), prefix + f.name, f"must be a finite number (got {value})")


def _may_differ_on_resume(default: Any) -> Any:
    """A model setting that no parameter's shape or meaning depends on: a checkpoint resumes under another value."""
    return field(default=default, metadata={"may_differ_on_resume": True})

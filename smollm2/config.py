"""Configuration: one dataclass per component, loaded from a YAML preset plus `key=value` overrides.

    cfg = load_config("configs/tiny.yaml", ["train.max_steps=7", "optim.lr=1e-3"])

Unknown keys and wrong types raise ConfigError naming the key (and the closest valid one); impossible values are rejected by
`validate` with a one-line reason. The resolved config is plain data: `to_dict(cfg)` / `to_yaml(cfg)` for saving.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from smollm2.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 50258  # GPT-2's 50,257 + one pad token
    pad_vocab_multiple: int = 128  # storage padding of the embedding table (50,258 -> 50,304)
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_mlp: int = 3072
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention: str = "auto"  # auto (flash_attn if importable on CUDA, else SDPA) | sdpa | flash_attn | naive


@dataclass
class DataConfig:
    path: str = "data/shakespeare"  # a prepared dataset directory (train_*.bin, val_*.bin, manifest.json)
    seq_len: int = 2048
    micro_batch: int = 8  # windows per rank per micro-step
    seed: int = 1234  # global window order
    prefetch: int = 2  # batches prepared ahead by a background thread (0 = none)


@dataclass
class TrainConfig:
    max_steps: int = 5000
    run_dir: str = "runs/smollm2"
    dtype: str = "bf16"  # bf16 | fp32 (parameters are kept in fp32; bf16 is the compute/communication dtype)
    seed: int = 1337
    resume: str | None = None  # null | latest | a checkpoint directory
    grad_accum: int = 4
    activation_checkpointing: str = "none"  # none | full | selective
    compile: str = "auto"  # auto (on for CUDA, off for CPU) | true | false
    device: str = "auto"  # auto | cuda | cpu
    reshard_after_forward: bool = True
    # FSDP2 units: block (each block, plus a root unit for embedding, final norm and tied head) | root (one unit for
    # the whole model: one all-gather per micro-step, one reduce-scatter per step, fewest host-side hooks) | auto (root at world
    # size 1, where sharding saves nothing, block otherwise). The checkpoint format is the same for all three.
    fsdp_wrap: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 200
    schedule: str = "cosine"  # cosine | wsd | constant
    # The schedule's horizon is its own number, not train.max_steps, so that phase 2 (max_steps 5000 -> 5050) continues the
    # same curve: no re-warmup, no jump.
    decay_steps: int = 5050
    wsd_decay_fraction: float = 0.2  # wsd: the last fraction of decay_steps decays linearly
    min_lr_ratio: float = 0.1  # floor = lr * min_lr_ratio
    fused: str = "auto"  # auto (fused on CUDA, foreach elsewhere) | true | false


@dataclass
class EvalConfig:
    interval: int = 100  # steps; 0 = never
    windows: int = 256  # the fixed val set: the first `windows` val windows, the same at any world size


@dataclass
class GenerateConfig:
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.95
    max_new_tokens: int = 100
    stop_at_eos: bool = True
    seed: int = 0


@dataclass
class SampleConfig:
    interval: int = 200  # steps; 0 = never
    prompts: list[str] = field(
        default_factory=lambda: ["The meaning of life is", "Once upon a time,", "To be, or not to be:"]
    )


@dataclass
class CheckpointConfig:
    interval: int = 500  # steps; a checkpoint is also written at the end of every run
    keep_last: int = 3  # complete checkpoints kept; 0 = keep all


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "smollm2"
    entity: str | None = None
    name: str | None = None


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between log lines (each costs one host sync)
    peak_tflops: float | None = None  # per-device bf16 peak for MFU; null = from the GPU table
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------------------------- loading


def _valid_keys(cls: type, prefix: str = "") -> dict[str, bool]:
    """Every dotted key of the schema -> whether it is a section (a nested dataclass)."""
    keys: dict[str, bool] = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        sub = f.default_factory
        nested = isinstance(sub, type) and dataclasses.is_dataclass(sub)
        keys[name] = nested
        if nested:
            keys.update(_valid_keys(sub, name + "."))
    return keys


_KEYS = _valid_keys(Config)


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        out: list[tuple[str, Any]] = []
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and _KEYS.get(key, False):
                out.extend(_flatten(v, key + "."))
            else:
                out.append((key, v))
        return out
    return [(prefix.rstrip("."), tree)]


def _check_key(key: str, where: str) -> None:
    if key in _KEYS and not _KEYS[key]:
        return
    if key in _KEYS:  # a section given a scalar
        raise ConfigError(f"{where}: '{key}' is a section, not a value; set one of its keys, e.g. '{key}.<name>=...'")
    close = difflib.get_close_matches(key, [k for k, nested in _KEYS.items() if not nested], n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see smollm2/config.py for the valid keys"
    raise ConfigError(f"{where}: unknown config key '{key}'{hint}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML preset <- `key=value` overrides, then validation."""
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
        except OmegaConfBaseException as err:  # YAML syntax
            raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
        except Exception as err:  # noqa: BLE001 - yaml.YAMLError and friends
            raise ConfigError(f"{path}: cannot parse YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, train:, ...)")
        for key, _ in _flatten(raw):
            _check_key(key, str(path))
        layers.append((str(path), OmegaConf.create(raw)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=100)")
        key = item.split("=", 1)[0].strip().lstrip("+")
        _check_key(key, "command line")
        try:
            layers.append((f"override '{item}'", OmegaConf.from_dotlist([item.lstrip("+")])))
        except OmegaConfBaseException as err:
            raise ConfigError(f"override '{item}': {str(err).splitlines()[0]}") from None
    merged = schema
    for where, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            msg = str(err).splitlines()[0]
            raise ConfigError(f"{where}: bad value for '{key}': {msg}") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config: {key} {reason}")


def _one_of(value: Any, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)} (got {value!r})")


def validate(cfg: Config) -> None:
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    for key, value in [
        ("model.vocab_size", m.vocab_size), ("model.n_layer", m.n_layer), ("model.n_head", m.n_head),
        ("model.d_model", m.d_model), ("model.d_mlp", m.d_mlp), ("model.max_seq_len", m.max_seq_len),
        ("model.pad_vocab_multiple", m.pad_vocab_multiple), ("data.seq_len", d.seq_len),
        ("data.micro_batch", d.micro_batch), ("train.max_steps", t.max_steps), ("train.grad_accum", t.grad_accum),
        ("optim.decay_steps", o.decay_steps), ("eval.windows", cfg.eval.windows),
        ("generate.max_new_tokens", cfg.generate.max_new_tokens), ("logging.interval", cfg.logging.interval),
    ]:
        _require(value > 0, key, f"must be positive (got {value})")
    for key, value in [
        ("eval.interval", cfg.eval.interval), ("sample.interval", cfg.sample.interval),
        ("checkpoint.interval", cfg.checkpoint.interval), ("checkpoint.keep_last", cfg.checkpoint.keep_last),
        ("optim.warmup_steps", o.warmup_steps), ("optim.weight_decay", o.weight_decay), ("data.prefetch", d.prefetch),
        ("generate.top_k", cfg.generate.top_k), ("generate.temperature", cfg.generate.temperature),
    ]:
        _require(value >= 0, key, f"must be >= 0 (got {value})")
    _require(m.d_model % m.n_head == 0, "model.d_model", f"({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    _require((m.d_model // m.n_head) % 2 == 0, "model.d_model / model.n_head", "(head dim) must be even for RoPE")
    _require(d.seq_len <= m.max_seq_len, "data.seq_len", f"({d.seq_len}) must be <= model.max_seq_len ({m.max_seq_len})")
    _require(o.lr > 0, "optim.lr", f"must be positive (got {o.lr})")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, 0 disables clipping (got {o.grad_clip})")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1] (got {o.min_lr_ratio})")
    _require(0 < o.wsd_decay_fraction <= 1, "optim.wsd_decay_fraction", f"must be in (0, 1] (got {o.wsd_decay_fraction})")
    _require(o.warmup_steps <= o.decay_steps, "optim.warmup_steps",
             f"({o.warmup_steps}) must be <= optim.decay_steps ({o.decay_steps})")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
    _require(0 < cfg.generate.top_p <= 1, "generate.top_p", f"must be in (0, 1] (got {cfg.generate.top_p})")
    _one_of(m.attention, "model.attention", ("auto", "sdpa", "flash_attn", "naive"))
    _one_of(t.dtype, "train.dtype", ("bf16", "fp32"))
    _one_of(t.activation_checkpointing, "train.activation_checkpointing", ("none", "full", "selective"))
    _one_of(str(t.compile).lower(), "train.compile", ("auto", "true", "false"))
    _one_of(t.fsdp_wrap, "train.fsdp_wrap", ("auto", "block", "root"))
    _one_of(str(o.fused).lower(), "optim.fused", ("auto", "true", "false"))
    _one_of(t.device, "train.device", ("auto", "cuda", "cpu"))
    _one_of(o.schedule, "optim.schedule", ("cosine", "wsd", "constant"))
    _one_of(cfg.logging.wandb.mode, "logging.wandb.mode", ("disabled", "offline", "online"))
    _require(bool(t.run_dir), "train.run_dir", "must not be empty")


# ---------------------------------------------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(section: Any) -> str:
    """A short, stable hash of a config section (used to recognise checkpoints of the same model)."""
    blob = json.dumps(dataclasses.asdict(section), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in data.items() if k in known})


def split_cli(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split argv into (flags, key=value overrides): anything with '=' that is not a --flag is an override."""
    flags, overrides = [], []
    for arg in argv:
        (overrides if ("=" in arg and not arg.startswith("-")) else flags).append(arg)
    return flags, overrides

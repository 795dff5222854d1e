"""The configuration schema: one dataclass per component, each with the `check` of its own values.

Loading (YAML presets, `key=value` overrides, saved configs) is in smollm2/config/loading.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from smollm2.config.choices import (  # noqa: F401 - the choices are the schema's names too
    LOG_MODEL_CHOICES,
    AttentionBackend,
    Choice,
    Device,
    Dtype,
    FsdpWrap,
    Mlp,
    Norm,
    Recompute,
    Schedule,
    WandbMode,
    WandbWatch,
    _all_finite,
    _may_differ_on_resume,
    _non_negative,
    _positive,
    _require,
)


@dataclass
class ModelConfig:
    vocab_size: int = 50258  # GPT-2's 50,257 + one pad token
    pad_vocab_multiple: int = 128  # storage padding of the embedding table (50,258 -> 50,304)
    n_layer: int = 12
    n_head: int = 12
    # Grouped-query attention: key/value heads, each shared by n_head / n_kv_head query heads; null = n_head (multi-head)
    n_kv_head: int | None = None
    d_model: int = 768
    d_mlp: int = 3072  # the MLP's hidden width (SwiGLU: of each of gate and up)
    norm: Norm = Norm.layernorm
    mlp: Mlp = Mlp.gelu
    bias: bool = True  # biases on every linear layer (and the LayerNorms); Llama-style models have none
    tie_embeddings: bool = True  # the LM head is the token embedding table
    # The longest sequence the model is used for (training windows, prompt + generated tokens). No parameter depends on it
    # (the RoPE tables are buffers, not saved), so a checkpoint resumes under another value.
    max_seq_len: int = _may_differ_on_resume(2048)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = _may_differ_on_resume(0.02)  # used only to initialize
    attention: AttentionBackend = _may_differ_on_resume(AttentionBackend.auto)
    # Attention stops at the end of each document (an EOS) inside a training window; RoPE positions restart there unless
    # data.position_reset=false. Training only: generation sees one sequence. No tensor depends on it.
    document_masking: bool = _may_differ_on_resume(False)

    def check(self) -> None:
        _positive(self, "model.", "vocab_size", "pad_vocab_multiple", "n_layer", "n_head", "d_model", "d_mlp",
                  "max_seq_len")
        _require(self.d_model % self.n_head == 0, "model.d_model",
                 f"({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        _require((self.d_model // self.n_head) % 2 == 0, "model.d_model / model.n_head", "(head dim) must be even for RoPE")
        _require(self.kv_heads > 0 and self.n_head % self.kv_heads == 0, "model.n_kv_head",
                 f"({self.n_kv_head}) must be positive and divide model.n_head ({self.n_head})")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# The model keys a resume may change; every other one must match the checkpoint's (checkpoint.manager checks).
MAY_DIFFER_ON_RESUME = frozenset(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("may_differ_on_resume"))


@dataclass
class MixtureSource:
    """One source of a mixture: a prepared dataset directory, its weight (any positive number: the weights of a mixture
    are normalized) and a name for logs and metrics (default: the directory's name)."""

    path: str = ""
    weight: float | None = None
    name: str | None = None


@dataclass
class DataStage:
    """From `start_step` completed optimizer steps on, the run draws from `mixture` (the first stage starts at 0)."""

    start_step: int = 0
    mixture: list[MixtureSource] = field(default_factory=list)


@dataclass
class DataConfig:
    path: str = "data/shakespeare"  # a prepared dataset directory (train_*.bin, val_*.bin, manifest.json)
    # Several datasets drawn by weight, e.g. [{path: data/web, weight: 0.7}, {path: data/code, weight: 0.3}]; replaces
    # `path` (docs/data.md, "Mixtures"). `stages` instead: mixtures that change at given steps. Both empty: `path` alone.
    mixture: list[MixtureSource] = field(default_factory=list)
    stages: list[DataStage] = field(default_factory=list)
    seq_len: int = 2048  # <= model.max_seq_len
    micro_batch: int = 8  # windows per rank per micro-step
    seed: int = 1234  # global window order
    prefetch: int = 2  # batches prepared ahead by a background thread (0 = none)
    position_reset: bool | None = None  # RoPE positions restart at each document; null = with model.document_masking

    def check(self) -> None:
        _positive(self, "data.", "seq_len", "micro_batch")
        _non_negative(self, "data.", "prefetch")
        _require(not (self.mixture and self.stages), "data.mixture",
                 "and data.stages are exclusive: each stage has its own mixture; drop one")
        stages = self.stage_list()
        key = "data.stages" if self.stages else "data.mixture"
        for k, stage in enumerate(stages):
            where = f"data.stages[{k}]" if self.stages else "data.mixture"
            _require(bool(stage.mixture), f"{where}.mixture" if self.stages else where, "lists no source")
            _require(stage.start_step >= 0, f"{where}.start_step", f"must be >= 0 (got {stage.start_step})")
            if k == 0:
                _require(stage.start_step == 0, f"{where}.start_step", f"of the first stage must be 0 (got "
                         f"{stage.start_step})")
            else:
                before = stages[k - 1].start_step
                _require(stage.start_step > before, f"{where}.start_step",
                         f"({stage.start_step}) must be after the previous stage's ({before})")
            names = set()
            for i, source in enumerate(stage.mixture):
                at = f"{where}{'.mixture' if self.stages else ''}[{i}]"
                _require(bool(source.path), f"{at}.path", "is missing: a prepared dataset directory")
                _require(source.weight is not None, f"{at}.weight", "is missing: a positive number")
                _require(source.weight > 0, f"{at}.weight", f"must be positive (got {source.weight})")
                name = source_name(source)
                _require(name not in names, f"{at}.name", f"'{name}' names two sources of {key}: give each a name")
                names.add(name)
        paths: dict[str, str] = {}
        for stage in stages:
            for source in stage.mixture:
                name = source_name(source)
                _require(paths.setdefault(name, source.path) == source.path, f"{key} source '{name}'",
                         f"has two paths ({paths[name]}, {source.path}): one name, one dataset")

    def stage_list(self) -> list[DataStage]:
        """The mixtures of the run, as stages (one for data.mixture); [] for the one-source case (data.path)."""
        return list(self.stages) or ([DataStage(0, list(self.mixture))] if self.mixture else [])

    def tokenizer_path(self) -> str:
        """A dataset of the run, the one whose tokenizer the checkpoints carry (every source shares it)."""
        stages = self.stage_list()
        return stages[0].mixture[0].path if stages else self.path


def source_name(source: MixtureSource) -> str:
    return source.name or (source.path.rstrip("/").rsplit("/", 1)[-1] or source.path)


@dataclass
class TrainConfig:
    max_steps: int = 5000
    run_dir: str = "runs/smollm2"
    dtype: Dtype = Dtype.bf16  # parameters are kept in fp32; bf16 is the compute/communication dtype
    seed: int = 1337
    resume: str | None = None  # null | latest | a checkpoint directory
    # A new run starting from a checkpoint's weights (e.g. `python -m smollm2.convert --from-hf` output): step 0, a fresh
    # optimizer, the data from its start, a new WandB run. `resume` instead continues a run (after a crash, phase 2).
    init_from: str | None = None
    grad_accum: int = 4
    activation_checkpointing: Recompute = Recompute.none
    compile: bool | None = None  # null = auto: on for CUDA, off for CPU
    # Compiled graphs launch their kernels from generated C++ instead of Python: less host time per step, a longer first
    # compile (docs/performance.md, "The C++ wrapper"). null = auto: on for CPU; off for CUDA until measured there.
    cpp_wrapper: bool | None = None
    device: Device = Device.auto
    reshard_after_forward: bool = True
    fsdp_wrap: FsdpWrap = FsdpWrap.auto
    # HSDP: ranks per shard group (parameters sharded inside a group, replicated across groups; gradients reduce-scattered
    # in the group, then all-reduced across groups). 0 = all ranks, plain FSDP. On a cluster: the GPUs of one node.
    dp_shard: int = 0
    # The gradients' dtype on the wire (reduce-scatter / all-reduce) under train.dtype=bf16: fp32 is exact, bf16 halves the
    # bytes and rounds each rank's contribution (docs/scale.md, "HSDP").
    reduce_dtype: Dtype = Dtype.fp32
    # How long any collective (and joining the process group) may wait for the other ranks before it fails with an error
    # naming the operation, instead of hanging. A first checkpoint of the seed model on slow shared storage can take
    # minutes: keep it well above one.
    dist_timeout_min: float = 30.0
    # A torch.profiler trace of optimizer steps [start, end] (inclusive), per rank, into <run_dir>/profile/ ([] = none)
    profile_steps: list[int] = field(default_factory=list)
    memory_snapshot: int | None = None  # a CUDA memory snapshot after this step (docs/observe.md, "Profiles")

    def check(self) -> None:
        _positive(self, "train.", "max_steps", "grad_accum", "dist_timeout_min")
        steps = self.profile_steps
        _require(not steps or (len(steps) == 2 and 1 <= steps[0] <= steps[1]), "train.profile_steps",
                 f"must be [start, end] with 1 <= start <= end (got {list(steps)})")
        _require(self.memory_snapshot is None or self.memory_snapshot >= 1, "train.memory_snapshot",
                 f"must be a step >= 1 (got {self.memory_snapshot})")
        _non_negative(self, "train.", "dp_shard")
        _require(bool(self.run_dir), "train.run_dir", "must not be empty")
        _require(not (self.init_from and self.resume), "train.init_from",
                 f"({self.init_from}) and train.resume / --resume ({self.resume}) are exclusive: init_from starts a new run "
                 "from a checkpoint's weights, --resume continues a run; drop one")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_steps: int = 200
    schedule: Schedule = Schedule.cosine
    # The schedule's horizon is its own number, not train.max_steps, so that phase 2 (max_steps 5000 -> 5050) continues the
    # same curve: no re-warmup, no jump.
    decay_steps: int = 5050
    wsd_decay_fraction: float = 0.2  # wsd: the last fraction of decay_steps decays linearly
    min_lr_ratio: float = 0.1  # floor = lr * min_lr_ratio
    fused: bool | None = None  # null = auto: fused on CUDA, torch's single-tensor loop elsewhere
    # Skip the update of a step whose loss or gradient norm is above mean + z * std of the last `spike_window` accepted
    # steps (off until the window is full); the step's data is consumed all the same. Needs the fused AdamW (on CPU too).
    spike_guard: bool = False
    spike_window: int = 128
    spike_z_loss: float = 3.6
    spike_z_grad: float = 6.0
    spike_max_skips: int = 10  # consecutive skips that stop the run (the last good checkpoint is kept)

    def check(self) -> None:
        _positive(self, "optim.", "lr", "decay_steps")
        _non_negative(self, "optim.", "warmup_steps", "weight_decay")
        _require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, 0 disables clipping (got {self.grad_clip})")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1] (got {self.min_lr_ratio})")
        _require(0 < self.wsd_decay_fraction <= 1, "optim.wsd_decay_fraction",
                 f"must be in (0, 1] (got {self.wsd_decay_fraction})")
        _require(self.warmup_steps <= self.decay_steps, "optim.warmup_steps",
                 f"({self.warmup_steps}) must be <= optim.decay_steps ({self.decay_steps})")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        _positive(self, "optim.", "spike_z_loss", "spike_z_grad", "spike_max_skips")
        _require(self.spike_window >= 2, "optim.spike_window", f"must be >= 2 (got {self.spike_window})")
        _require(not (self.spike_guard and self.fused is False), "optim.spike_guard",
                 "skips an update inside the fused AdamW (no host sync): drop optim.fused=false")


@dataclass
class EvalConfig:
    interval: int = 100  # steps; 0 = never
    windows: int = 256  # the fixed val set: the first `windows` val windows, the same at any world size

    def check(self) -> None:
        _positive(self, "eval.", "windows")
        _non_negative(self, "eval.", "interval")


@dataclass
class GenerateConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 50  # 0 = off
    top_p: float = 0.95
    max_new_tokens: int = 100
    stop_at_eos: bool = True
    seed: int = 0

    def check(self) -> None:
        _positive(self, "generate.", "max_new_tokens")
        _non_negative(self, "generate.", "top_k", "temperature")
        _require(0 < self.top_p <= 1, "generate.top_p", f"must be in (0, 1] (got {self.top_p})")


@dataclass
class SampleConfig:
    interval: int = 200  # steps; 0 = never
    prompts: list[str] = field(
        default_factory=lambda: ["The meaning of life is", "Once upon a time,", "To be, or not to be:"]
    )

    def check(self) -> None:
        _non_negative(self, "sample.", "interval")


@dataclass
class CheckpointConfig:
    interval: int = 500  # steps; a checkpoint is also written at the end of every run
    keep_last: int = 3  # complete checkpoints kept, besides those kept forever; 0 = keep all
    # Kept forever, never rotated by keep_last: checkpoints at multiples of keep_every (0 = none) and each run's final
    # one, so a later phase's checkpoints (preemption saves) cannot delete the step a phase ended at.
    keep_every: int = 500
    # Save in the background (DCP's async save): training stalls only for the device-to-host copy; the files are written
    # while it continues. The next save (and the end of the run) waits for the previous one, which is committed
    # (COMPLETE, the rename, `latest`) only once every rank's write finished. Costs one host copy of the state in memory.
    async_save: bool = False

    def check(self) -> None:
        _non_negative(self, "checkpoint.", "interval", "keep_last", "keep_every")


@dataclass
class WandbConfig:
    """The WANDB_* environment variables win over these keys (WandB's own convention): see smollm2/observe/tracking.py."""

    mode: WandbMode = WandbMode.disabled
    project: str = "smollm2"
    entity: str | None = None
    name: str | None = None
    watch: WandbWatch = WandbWatch.off
    log_model: str = "false"  # false | checkpoint (= true) | end; YAML's bare true/false work too
    histogram_interval: int = 10  # log steps between gradient/parameter histograms (with watch)

    def check(self) -> None:
        _positive(self, "logging.wandb.", "histogram_interval")
        _require(str(self.log_model).lower() in LOG_MODEL_CHOICES, "logging.wandb.log_model",
                 f"must be one of false, true, checkpoint, end (got {self.log_model!r})")


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between log lines (each costs one host sync)
    peak_tflops: float | None = None  # per-device bf16 peak for MFU; null = from the GPU table
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def check(self) -> None:
        _positive(self, "logging.", "interval")
        self.wandb.check()


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

    def check(self) -> None:
        """Every number finite, each section's own constraints, then the ones across sections."""
        _all_finite(self, "")
        for section in (self.model, self.data, self.train, self.optim, self.eval, self.generate, self.sample,
                        self.checkpoint, self.logging):
            section.check()
        _require(self.data.seq_len <= self.model.max_seq_len, "data.seq_len",
                 f"({self.data.seq_len}) must be <= model.max_seq_len ({self.model.max_seq_len})")
        _require(not (self.data.position_reset and not self.model.document_masking), "data.position_reset",
                 "needs model.document_masking=true: positions restarting while attention still sees the documents "
                 "before would tell the model nothing true")

"""The configuration: the schema (schema.py, one dataclass per component; the values keys take and the checks, in
choices.py) and how configs are read and written (loading.py: YAML presets with `key=value` overrides, strictly; saved
configs, leniently)."""

from smollm2.config.loading import (
    CONFIG_VERSION,
    load_config,
    load_saved_config,
    model_config_from_dict,
    to_dict,
    to_yaml,
    validate,
)
from smollm2.config.schema import (
    LOG_MODEL_CHOICES,
    MAY_DIFFER_ON_RESUME,
    AttentionBackend,
    CheckpointConfig,
    Choice,
    Config,
    DataConfig,
    DataStage,
    Device,
    Dtype,
    EvalConfig,
    FsdpWrap,
    GenerateConfig,
    LoggingConfig,
    MixtureSource,
    Mlp,
    ModelConfig,
    Norm,
    OptimConfig,
    Recompute,
    SampleConfig,
    Schedule,
    TrainConfig,
    WandbConfig,
    WandbMode,
    WandbWatch,
    source_name,
)

__all__ = ["CONFIG_VERSION", "LOG_MODEL_CHOICES", "MAY_DIFFER_ON_RESUME", "AttentionBackend", "CheckpointConfig",
           "Choice", "Config", "DataConfig", "DataStage", "Device", "Dtype", "EvalConfig", "FsdpWrap", "GenerateConfig",
           "LoggingConfig", "Mlp", "MixtureSource", "ModelConfig", "Norm", "OptimConfig", "Recompute", "SampleConfig", "Schedule",
           "TrainConfig", "WandbConfig", "WandbMode", "WandbWatch", "load_config", "load_saved_config", "source_name",
           "model_config_from_dict", "to_dict", "to_yaml", "validate"]

"""The configuration: the schema (schema.py, one dataclass per component) and how configs are read and written
(loading.py: YAML presets with `key=value` overrides, strictly; saved configs, leniently)."""

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
    Device,
    Dtype,
    EvalConfig,
    FsdpWrap,
    GenerateConfig,
    LoggingConfig,
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
)

__all__ = ["CONFIG_VERSION", "LOG_MODEL_CHOICES", "MAY_DIFFER_ON_RESUME", "AttentionBackend", "CheckpointConfig",
           "Choice", "Config", "DataConfig", "Device", "Dtype", "EvalConfig", "FsdpWrap", "GenerateConfig",
           "LoggingConfig", "Mlp", "ModelConfig", "Norm", "OptimConfig", "Recompute", "SampleConfig", "Schedule",
           "TrainConfig", "WandbConfig", "WandbMode", "WandbWatch", "load_config", "load_saved_config",
           "model_config_from_dict", "to_dict", "to_yaml", "validate"]

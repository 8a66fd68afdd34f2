"""Configuration: the typed schema (`schema`) and loading it from YAML, presets and overrides (`loading`)."""

from ssb.config.loading import (
    PRESETS_DIR,
    config_hash,
    describe,
    load_config,
    parse_override,
    preset_names,
    preset_path,
    read_yaml,
    save_config,
)
from ssb.config.schema import (
    DEFAULT_SYSTEM_PROMPT,
    EMBEDDED_MODEL,
    Config,
    ConfigError,
    CurateConfig,
    DataConfig,
    DatasetSpec,
    EvalConfig,
    GRPOConfig,
    LogitsConfig,
    RolloutConfig,
    TeachConfig,
    TrainConfig,
    flatten,
    to_dict,
    validate,
)

__all__ = [
    "DEFAULT_SYSTEM_PROMPT", "EMBEDDED_MODEL", "PRESETS_DIR", "Config", "ConfigError", "CurateConfig", "DataConfig",
    "DatasetSpec", "EvalConfig", "GRPOConfig", "LogitsConfig", "RolloutConfig", "TeachConfig", "TrainConfig",
    "config_hash", "describe", "flatten", "load_config", "parse_override", "preset_names", "preset_path",
    "read_yaml", "save_config", "to_dict", "validate",
]

"""Run configuration: one dataclass per concern, loaded from TOML, overridden with dotted CLI keys.

Every field is validated before any work starts; errors name the field (``train.lr``) and the value.
Plug-ins (routers, tasks) bring their own tables (``[router.dts]``, ``[task.mt]``). Files carry a schema
version; older saved configs are migrated (versions.py).
"""

from __future__ import annotations

from .errors import ConfigError, check, choice
from .io import (
    apply_dict,
    apply_overrides,
    config_from_dict,
    config_help,
    load_config,
    parse_override,
    preset_names,
    read_toml,
    resolve_config_path,
    split_overrides,
    to_dict,
    to_toml,
)
from .schema import (
    PRESET_DIR,
    SCHEMA_VERSION,
    Config,
    DataConfig,
    EvolveConfig,
    GateConfig,
    ModelConfig,
    MoEConfig,
    NoOptions,
    ParallelConfig,
    TrainConfig,
    is_moe_block,
    router_config,
)
from .validate import finite_nonneg, validate

__all__ = [
    "PRESET_DIR",
    "SCHEMA_VERSION",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvolveConfig",
    "GateConfig",
    "ModelConfig",
    "MoEConfig",
    "NoOptions",
    "ParallelConfig",
    "TrainConfig",
    "apply_dict",
    "apply_overrides",
    "check",
    "choice",
    "config_from_dict",
    "finite_nonneg",
    "is_moe_block",
    "load_config",
    "parse_override",
    "config_help",
    "preset_names",
    "read_toml",
    "resolve_config_path",
    "router_config",
    "split_overrides",
    "to_dict",
    "to_toml",
    "validate",
]

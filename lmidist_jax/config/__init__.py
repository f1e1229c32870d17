"""Engine configuration: defaults < environment < serving.properties < keyword options.

The option table is in :mod:`lmidist_jax.config.options`. To patch the "not yet
supported" switches in tests, patch them on ``lmidist_jax.config.options``.
"""

from .errors import ConfigError
from .options import (
    LORA_OPTIONS,
    NOT_YET_SUPPORTED,
    TENSOR_PARALLEL_SUPPORTED,
    EngineConfig,
    config_from_kwargs,
)
from .properties import (
    ENV_ALIASES,
    ENV_DIRECT,
    PROPERTIES_FILE,
    find_properties,
    options_from_env,
    options_from_properties,
    parse_properties,
    read_properties,
)

__all__ = [
    "ConfigError",
    "EngineConfig",
    "config_from_kwargs",
    "NOT_YET_SUPPORTED",
    "TENSOR_PARALLEL_SUPPORTED",
    "LORA_OPTIONS",
    "read_properties",
    "parse_properties",
    "find_properties",
    "options_from_env",
    "options_from_properties",
    "ENV_ALIASES",
    "ENV_DIRECT",
    "PROPERTIES_FILE",
]

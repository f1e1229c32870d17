"""Checkpoint discovery/loading and format converters (GGUF -> HF)."""

from .checkpoint import ModelLoadError, iter_checkpoint_tensors, load_config, parse_dtype, resolve_model_dir
from .gguf import GGUFConversionError, convert_gguf_to_hf

__all__ = [
    "GGUFConversionError",
    "ModelLoadError",
    "convert_gguf_to_hf",
    "iter_checkpoint_tensors",
    "load_config",
    "parse_dtype",
    "resolve_model_dir",
]

"""The model families: one registration per family, holding everything that makes it
itself: the HF architecture names it answers to, the builder of its ``ModelSpec`` from
``config.json``, and its weight map (checkpoint names -> parameters). The decoder, the
loader, the engine and the server never name a family.

A new family is a module here that calls ``register(Family(...))``, imported below.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

import numpy as np

from ..spec import ModelSpec, UnsupportedModelError
from ..weight_map import WeightMap


@dataclasses.dataclass(frozen=True)
class Family:
    name: str                                  # as the README's model table lists it
    architectures: tuple[str, ...]             # HF `architectures` names
    build_spec: Callable[[dict, str], ModelSpec]
    weight_map: Callable[[ModelSpec], WeightMap]
    # For the README's model table: norm, positions, residual, MLP.
    summary: str = ""


_BY_ARCHITECTURE: dict[str, Family] = {}
FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    for architecture in family.architectures:
        if architecture in _BY_ARCHITECTURE:
            raise ValueError(f"architecture {architecture} is registered twice "
                             f"({_BY_ARCHITECTURE[architecture].name} and {family.name})")
        _BY_ARCHITECTURE[architecture] = family
    FAMILIES.append(family)
    return family


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def family_of(architecture: str) -> Family:
    try:
        return _BY_ARCHITECTURE[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model architecture {architecture}; lmidist-jax supports: "
            f"{', '.join(supported_architectures())}") from None


def spec_from_hf_config(config: dict) -> ModelSpec:
    """Build the normalized spec from a parsed HF config.json."""
    architectures = config.get("architectures") or []
    for architecture in architectures:
        if architecture in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[architecture].build_spec(config, architecture)
    named = ", ".join(architectures) or f"model_type={config.get('model_type')!r} (no architectures field)"
    raise UnsupportedModelError(
        f"unsupported model architecture {named}; lmidist-jax supports: "
        f"{', '.join(supported_architectures())}")


def map_checkpoint(spec: ModelSpec, tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator:
    """(parameter path, value) for every checkpoint tensor (see ``weight_map``)."""
    return family_of(spec.architecture).weight_map(spec).map(spec, tensors)


from . import (  # noqa: E402,F401  (registrations)
    baichuan, bloom, chatglm, decilm, falcon, gemma, glm, gpt2, gpt_neox, gptj, internlm2, llama, mpt, opt, phi, qwen,
    starcoder2,
)
from . import dbrx, mixtral  # noqa: E402,F401  (mixture-of-experts registrations)
from . import t5  # noqa: E402,F401  (encoder-decoder)

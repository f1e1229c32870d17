"""The normalized model spec: one description of a decoder-only transformer built
from an HF ``config.json``. Architectures differ here and in their weight-name
mapping, never in copies of the model code."""

from __future__ import annotations

import dataclasses
from typing import Any


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one lmidist-jax can run."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int

    # Normalization: "rms" or "layer"; Gemma scales by (1 + w).
    norm_type: str = "rms"
    norm_eps: float = 1e-6
    norm_scale_plus_one: bool = False

    # Positions: "rope" | "alibi" | "learned" | "none".
    position_type: str = "rope"
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # < head_dim for partial rotary (GPT-NeoX, Phi)
    rope_interleaved: bool = False  # GPT-J style pairs (x0,x1),(x2,x3)...
    rope_scaling: dict[str, Any] | None = None

    # Attention.
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    attn_logit_softcap: float | None = None
    query_scale: float | None = None  # default head_dim ** -0.5

    # MLP: "gated" (act(gate) * up) or "plain" (act(up)); activation name.
    mlp_type: str = "gated"
    activation: str = "silu"
    mlp_bias: bool = False

    # Residual layout: sequential (attn then MLP) or parallel (GPT-J / NeoX / Falcon).
    parallel_residual: bool = False

    tie_word_embeddings: bool = False
    embedding_multiplier: float | None = None  # Gemma: sqrt(hidden_size)
    final_logit_softcap: float | None = None

    # Mixture of experts (Mixtral, DBRX): 0 experts = dense MLP.
    num_experts: int = 0
    num_experts_per_token: int = 0

    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5

    @property
    def max_model_len(self) -> int:
        """Longest context the model supports, including rope scaling."""
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type in ("linear", "dynamic", "yarn") and "original_max_position_embeddings" not in scaling:
            return int(self.max_position_embeddings * float(scaling.get("factor", 1.0)))
        if rope_type == "yarn":
            return int(scaling["original_max_position_embeddings"] * float(scaling.get("factor", 1.0)))
        return self.max_position_embeddings


def _eos_ids(config: dict) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def _rope_config(config: dict) -> tuple[float, dict | None]:
    """Rope theta and scaling from either the classic (rope_theta/rope_scaling) or the
    transformers-5 (rope_parameters) config layout."""
    params = config.get("rope_parameters")
    theta = config.get("rope_theta")
    scaling = config.get("rope_scaling")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = dict(params)
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type in (None, "default"):
            scaling = None
        else:
            scaling["rope_type"] = rope_type
    return float(theta if theta is not None else 10000.0), scaling


def _llama_family(config: dict, architecture: str) -> ModelSpec:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    theta, scaling = _rope_config(config)
    if scaling is not None:
        supported = ("linear", "dynamic", "llama3", "yarn")
        if scaling["rope_type"] not in supported:
            raise UnsupportedModelError(
                f"rope_scaling type {scaling['rope_type']!r} is not supported; "
                f"supported: {', '.join(supported)}")

    model_type = config.get("model_type", "")
    sliding_window = config.get("sliding_window")
    if model_type == "qwen2" and not config.get("use_sliding_window", False):
        sliding_window = None
    qkv_bias = bool(config.get("attention_bias", False))
    o_bias = qkv_bias
    if model_type == "qwen2" or architecture == "Qwen2ForCausalLM":
        qkv_bias, o_bias = True, False
    if architecture == "InternLMForCausalLM":
        qkv_bias = o_bias = bool(config.get("bias", True))

    return ModelSpec(
        architecture=architecture,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        norm_type="rms",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        position_type="rope",
        rope_theta=theta,
        rotary_dim=int(head_dim * float(config.get("partial_rotary_factor", 1.0))),
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        sliding_window=int(sliding_window) if sliding_window else None,
        mlp_type="gated",
        activation=config.get("hidden_act", "silu"),
        mlp_bias=bool(config.get("mlp_bias", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_eos_ids(config),
    )


# HF architecture name -> spec builder. Later families add their builder here.
SPEC_BUILDERS = {
    "LlamaForCausalLM": _llama_family,
    "MistralForCausalLM": _llama_family,
    "Qwen2ForCausalLM": _llama_family,
    "YiForCausalLM": _llama_family,
    "AquilaForCausalLM": _llama_family,
    "AquilaModel": _llama_family,
    "InternLMForCausalLM": _llama_family,
}


def supported_architectures() -> list[str]:
    return sorted(SPEC_BUILDERS)


def spec_from_hf_config(config: dict) -> ModelSpec:
    """Build the normalized spec from a parsed HF config.json."""
    architectures = config.get("architectures") or []
    for architecture in architectures:
        if architecture in SPEC_BUILDERS:
            return SPEC_BUILDERS[architecture](config, architecture)
    named = ", ".join(architectures) or f"model_type={config.get('model_type')!r} (no architectures field)"
    raise UnsupportedModelError(
        f"unsupported model architecture {named}; lmidist-jax supports: "
        f"{', '.join(supported_architectures())}")

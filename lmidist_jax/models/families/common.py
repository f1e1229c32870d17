"""Pieces several family declarations share: config readers and the Llama-style
checkpoint names (``model.layers.N.self_attn.q_proj`` ...)."""

from __future__ import annotations

from ..spec import UnsupportedModelError
from ..weight_map import linear, part, to

SUPPORTED_ROPE_SCALING = ("linear", "dynamic", "llama3", "yarn")


def check_rope_scaling(scaling: dict | None) -> None:
    if scaling is not None and scaling["rope_type"] not in SUPPORTED_ROPE_SCALING:
        raise UnsupportedModelError(
            f"rope_scaling type {scaling['rope_type']!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_SCALING)}")


def refuse(condition: bool, message: str) -> None:
    """A config feature we do not run: a clear startup error, never a silent difference."""
    if condition:
        raise UnsupportedModelError(message)


def llama_layer_names(prefix: str = "model.layers.{i}", *, mlp: str = "gated") -> dict:
    """The Llama checkpoint names of one layer (q/k/v/o, gate/up/down, two norms),
    with their optional biases."""
    attn, layer = f"{prefix}.self_attn", "layers.{i}"
    names = {
        f"{prefix}.input_layernorm.weight": to(f"{layer}.input_norm.scale"),
        f"{prefix}.post_attention_layernorm.weight": to(f"{layer}.pre_mlp_norm.scale"),
        **linear(f"{attn}.o_proj", f"{layer}.attn.o_proj"),
    }
    for slot in "qkv":
        names[f"{attn}.{slot}_proj.weight"] = part(f"{layer}.attn.qkv_proj", slot)
        names[f"{attn}.{slot}_proj.bias"] = part(f"{layer}.attn.qkv_proj", slot, weight="bias")
    if mlp == "gated":
        for slot in ("gate", "up"):
            names[f"{prefix}.mlp.{slot}_proj.weight"] = part(f"{layer}.mlp.gate_up_proj", slot)
            names[f"{prefix}.mlp.{slot}_proj.bias"] = part(f"{layer}.mlp.gate_up_proj", slot, weight="bias")
        names.update(linear(f"{prefix}.mlp.down_proj", f"{layer}.mlp.down_proj"))
    return names


def llama_model_names(prefix: str = "model") -> dict:
    """Embedding, final norm and LM head under Llama's names."""
    return {
        f"{prefix}.embed_tokens.weight": to("embed.embedding"),
        f"{prefix}.norm.weight": to("final_norm.scale"),
        "lm_head.weight": to("lm_head", linear=True),
    }


def first(config: dict, *names: str, default=None):
    """The value of the first of ``names`` that the config sets (not None)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def partial_rotary_factor(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    return float(first(params, "partial_rotary_factor",
                       default=first(config, "partial_rotary_factor", "rotary_pct", default=1.0)))

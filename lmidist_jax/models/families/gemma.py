"""Gemma, Gemma 2 and Gemma 3 (text): Llama's names, (1 + w) RMSNorms, embeddings
scaled by sqrt(hidden); Gemma 2 adds sandwich norms, softcaps, query_pre_attn_scalar
and sliding/global alternation; Gemma 3 adds q/k norms and a local rope base."""

from __future__ import annotations

import math

from ..spec import ModelSpec, eos_ids, rope_config
from ..weight_map import WeightMap, to
from . import Family, register
from .common import check_rope_scaling, llama_layer_names, llama_model_names, refuse

SLIDING, FULL = "sliding_attention", "full_attention"


def _layer_types(config: dict, num_layers: int) -> tuple[str, ...] | None:
    types = config.get("layer_types")
    if types is None and config.get("sliding_window_pattern"):
        pattern = int(config["sliding_window_pattern"])  # every pattern-th layer is global
        types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]
    if types is None:
        return None
    unknown = sorted(set(types) - {SLIDING, FULL})
    refuse(bool(unknown), f"unsupported layer_types {unknown}; supported: {SLIDING}, {FULL}")
    return tuple("sliding" if t == SLIDING else "full" for t in types)


def _rope(config: dict) -> tuple[float, dict | None, float | None]:
    """(global theta, global scaling, local theta) from either the per-layer-type
    ``rope_parameters`` of transformers 5 or rope_theta/rope_scaling/rope_local_base_freq."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and FULL in params:
        theta, scaling = rope_config({"rope_parameters": params[FULL]})
        local = params.get(SLIDING)
        local_theta = None
        if local is not None:
            local_theta, local_scaling = rope_config({"rope_parameters": local})
            refuse(local_scaling is not None,
                   f"rope scaling on sliding-window layers ({local_scaling}) is not supported")
        return theta, scaling, local_theta
    theta, scaling = rope_config(config)
    return theta, scaling, config.get("rope_local_base_freq")


def gemma_spec(config: dict, architecture: str) -> ModelSpec:
    version = {"GemmaForCausalLM": 1, "Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 3}[architecture]
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    num_layers = int(config["num_hidden_layers"])
    theta, scaling, local_theta = _rope(config)
    check_rope_scaling(scaling)
    layer_types = _layer_types(config, num_layers) if version >= 2 else None
    window = config.get("sliding_window") if version >= 2 else None
    scalar = config.get("query_pre_attn_scalar") if version >= 2 else None
    bias = bool(config.get("attention_bias", False))
    return ModelSpec(
        architecture=architecture,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 8192)),
        norm_type="rms",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        norm_scale_plus_one=True,
        qk_norm="rms" if version == 3 else None,
        sandwich_norms=version >= 2,
        position_type="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=float(local_theta) if version == 3 and local_theta is not None else None,
        qkv_bias=bias,
        o_bias=bias,
        sliding_window=int(window) if window else None,
        layer_types=layer_types if window else None,
        # Gemma 3 keeps attn_logit_softcapping in its config but never applies it.
        attn_logit_softcap=config.get("attn_logit_softcapping") if version == 2 else None,
        final_logit_softcap=config.get("final_logit_softcapping") if version >= 2 else None,
        query_scale=float(scalar) ** -0.5 if scalar else None,
        mlp_type="gated",
        # transformers: Gemma reads hidden_act, Gemma 2/3 read hidden_activation.
        activation=(config.get("hidden_act") if version == 1 else config.get("hidden_activation"))
        or "gelu_pytorch_tanh",
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        embedding_multiplier=math.sqrt(hidden),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_ids(config),
    )


def gemma_weight_map(spec: ModelSpec) -> WeightMap:
    names = {**llama_model_names(), **llama_layer_names()}
    if spec.sandwich_norms:
        prefix, layer = "model.layers.{i}", "layers.{i}"
        names.update({
            f"{prefix}.post_attention_layernorm.weight": to(f"{layer}.attn_out_norm.scale"),
            f"{prefix}.pre_feedforward_layernorm.weight": to(f"{layer}.pre_mlp_norm.scale"),
            f"{prefix}.post_feedforward_layernorm.weight": to(f"{layer}.mlp_out_norm.scale"),
        })
    if spec.qk_norm:
        names.update({
            "model.layers.{i}.self_attn.q_norm.weight": to("layers.{i}.attn.q_norm.scale"),
            "model.layers.{i}.self_attn.k_norm.weight": to("layers.{i}.attn.k_norm.scale"),
        })
    return WeightMap(names)


register(Family(
    name="Gemma", architectures=("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"),
    build_spec=gemma_spec, weight_map=gemma_weight_map,
    summary="RMSNorm (1 + w), Gemma 2/3 sandwich norms, Gemma 3 q/k norms; rotary (Gemma 3: local "
            "base on sliding layers); sequential; gated GeLU-tanh; softcaps, sliding/global layers"))

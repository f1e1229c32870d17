"""Llama and the families that share its layout: Llama 2/3, Mistral, Qwen2, Yi, Aquila,
InternLM (v1)."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids, rope_config
from ..weight_map import WeightMap
from . import Family, register
from .common import check_rope_scaling, llama_layer_names, llama_model_names, partial_rotary_factor


def llama_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    theta, scaling = rope_config(config)
    check_rope_scaling(scaling)

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
        rotary_dim=int(head_dim * partial_rotary_factor(config)),
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        sliding_window=int(sliding_window) if sliding_window else None,
        mlp_type="gated",
        activation=config.get("hidden_act", "silu"),
        mlp_bias=bool(config.get("mlp_bias", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_ids(config),
    )


def llama_weight_map(spec: ModelSpec) -> WeightMap:
    return WeightMap({**llama_model_names(), **llama_layer_names()})


register(Family(
    name="Llama", architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                 "YiForCausalLM", "AquilaForCausalLM", "AquilaModel", "InternLMForCausalLM"),
    build_spec=llama_spec, weight_map=llama_weight_map,
    summary="RMSNorm; rotary (linear/dynamic/llama3/yarn scaling); sequential; gated SiLU"))

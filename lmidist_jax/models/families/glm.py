"""GLM (GLM-4, transformers-native ``GlmForCausalLM``): the Llama layout with RMSNorm,
partial rotary (``partial_rotary_factor``, 0.5 when absent) in interleaved pairs over the
first rotary dims of each head, q/k/v biases (``attention_bias``, o_proj never), and a
fused ``gate_up_proj`` [gate | up] SwiGLU."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids, rope_config
from ..weight_map import WeightMap, split_parts
from . import Family, register
from .common import check_rope_scaling, first, llama_layer_names, llama_model_names

P, L = "model.layers.{i}", "layers.{i}"


def glm_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    theta, scaling = rope_config(config)
    check_rope_scaling(scaling)
    # GlmConfig.__post_init__: kwargs.setdefault("partial_rotary_factor", 0.5).
    factor = first(config.get("rope_parameters") or {}, "partial_rotary_factor",
                   default=first(config, "partial_rotary_factor", default=0.5))
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=head_dim,
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 131072)),
        norm_type="rms", norm_eps=float(config.get("rms_norm_eps", 1.5625e-07)),
        position_type="rope", rope_theta=theta, rope_scaling=scaling,
        rotary_dim=int(head_dim * float(factor)), rope_interleaved=True,
        qkv_bias=bool(config.get("attention_bias", True)), o_bias=False,
        mlp_type="gated", activation=config.get("hidden_act", "silu"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def glm_weight_map(spec: ModelSpec) -> WeightMap:
    return WeightMap({
        **llama_model_names(), **llama_layer_names(),
        f"{P}.mlp.gate_up_proj.weight": split_parts(f"{L}.mlp.gate_up_proj", ("gate", "up")),
    })


register(Family(
    name="GLM", architectures=("GlmForCausalLM",), build_spec=glm_spec, weight_map=glm_weight_map,
    summary="RMSNorm; partial rotary (half), interleaved pairs; sequential; gated SiLU from fused gate_up_proj"))

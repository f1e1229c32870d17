"""StarCoder2: Llama's attention names with biases, LayerNorm, plain GeLU-tanh MLP
(c_fc / c_proj), optional sliding window."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids, rope_config
from ..weight_map import WeightMap, linear, norm, to
from . import Family, register
from .common import check_rope_scaling, llama_layer_names

P, L = "model.layers.{i}", "layers.{i}"


def starcoder2_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    theta, scaling = rope_config(config)
    check_rope_scaling(scaling)
    bias = bool(config.get("use_bias", True))
    window = config.get("sliding_window")
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        norm_type="layer", norm_eps=float(config.get("norm_epsilon", 1e-5)),
        position_type="rope", rope_theta=theta, rope_scaling=scaling,
        qkv_bias=bias, o_bias=bias, sliding_window=int(window) if window else None,
        mlp_type="plain", activation=config.get("hidden_act", "gelu_pytorch_tanh"), mlp_bias=bias,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def starcoder2_weight_map(spec: ModelSpec) -> WeightMap:
    return WeightMap({
        **llama_layer_names(mlp="plain"),
        "model.embed_tokens.weight": to("embed.embedding"),
        "lm_head.weight": to("lm_head", linear=True),
        **norm("model.norm", "final_norm"),
        **norm(f"{P}.input_layernorm", f"{L}.input_norm"),
        **norm(f"{P}.post_attention_layernorm", f"{L}.pre_mlp_norm"),
        **linear(f"{P}.mlp.c_fc", f"{L}.mlp.up_proj"),
        **linear(f"{P}.mlp.c_proj", f"{L}.mlp.down_proj"),
    })


register(Family(
    name="StarCoder2", architectures=("Starcoder2ForCausalLM",), build_spec=starcoder2_spec,
    weight_map=starcoder2_weight_map,
    summary="LayerNorm; rotary; sequential; plain GeLU-tanh; biases; optional sliding window"))

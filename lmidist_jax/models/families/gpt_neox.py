"""GPT-NeoX (Pythia): LayerNorm, partial rotary, q/k/v fused per head, parallel or
sequential residual with two norms."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids, rope_config
from ..weight_map import WeightMap, fused_qkv, linear, norm, to
from . import Family, register
from .common import check_rope_scaling, partial_rotary_factor

P, L = "gpt_neox.layers.{i}", "layers.{i}"


def neox_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = hidden // heads
    theta, scaling = rope_config(config)
    check_rope_scaling(scaling)
    bias = bool(config.get("attention_bias", True))
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        norm_type="layer", norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        position_type="rope", rope_theta=theta, rope_scaling=scaling,
        rotary_dim=int(head_dim * partial_rotary_factor(config)),
        qkv_bias=bias, o_bias=bias, mlp_type="plain", activation=config.get("hidden_act", "gelu"), mlp_bias=True,
        parallel_residual=bool(config.get("use_parallel_residual", True)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def neox_weight_map(spec: ModelSpec) -> WeightMap:
    return WeightMap({
        "gpt_neox.embed_in.weight": to("embed.embedding"),
        "embed_out.weight": to("lm_head", linear=True),
        **norm("gpt_neox.final_layer_norm", "final_norm"),
        **norm(f"{P}.input_layernorm", f"{L}.input_norm"),
        **norm(f"{P}.post_attention_layernorm", f"{L}.pre_mlp_norm"),
        **fused_qkv(f"{P}.attention.query_key_value", f"{L}.attn.qkv_proj", "per_head"),
        **linear(f"{P}.attention.dense", f"{L}.attn.o_proj"),
        **linear(f"{P}.mlp.dense_h_to_4h", f"{L}.mlp.up_proj"),
        **linear(f"{P}.mlp.dense_4h_to_h", f"{L}.mlp.down_proj"),
    }, ignore=[r".*\.attention\.(masked_)?bias"])


register(Family(
    name="GPT-NeoX", architectures=("GPTNeoXForCausalLM",), build_spec=neox_spec, weight_map=neox_weight_map,
    summary="LayerNorm; partial rotary; parallel (two norms) or sequential; plain GeLU"))

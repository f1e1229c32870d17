"""Phi (1, 1.5, 2): LayerNorm, partial rotary, parallel residual with one shared norm,
optional q/k LayerNorm, LM head with a bias. Phi-3: Llama with fused qkv_proj and
gate_up_proj checkpoint tensors (and an optional sliding window)."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids, rope_config
from ..weight_map import WeightMap, linear, norm, split_parts, split_qkv, to
from . import Family, register
from .common import check_rope_scaling, llama_layer_names, llama_model_names, partial_rotary_factor
from .llama import llama_spec

P, L = "model.layers.{i}", "layers.{i}"


def phi_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    theta, scaling = rope_config(config)
    check_rope_scaling(scaling)
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=head_dim,
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        norm_type="layer", norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        qk_norm="layer" if config.get("qk_layernorm") else None,
        position_type="rope", rope_theta=theta, rope_scaling=scaling,
        rotary_dim=int(head_dim * partial_rotary_factor(config)),
        qkv_bias=True, o_bias=True, mlp_type="plain", activation=config.get("hidden_act", "gelu_new"),
        mlp_bias=True, parallel_residual=True, shared_input_norm=True,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), lm_head_bias=True,
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def phi_weight_map(spec: ModelSpec) -> WeightMap:
    llama = llama_layer_names()
    names = {
        "model.embed_tokens.weight": to("embed.embedding"),
        **linear("lm_head", "lm_head"),
        **norm("model.final_layernorm", "final_norm"),
        **norm(f"{P}.input_layernorm", f"{L}.input_norm"),
        **linear(f"{P}.self_attn.dense", f"{L}.attn.o_proj"),
        **linear(f"{P}.mlp.fc1", f"{L}.mlp.up_proj"),
        **linear(f"{P}.mlp.fc2", f"{L}.mlp.down_proj"),
        # q/k/v under Llama's names (with biases).
        **{name: target for name, target in llama.items() if ".self_attn." in name and "o_proj" not in name},
    }
    if spec.qk_norm:
        names.update({**norm(f"{P}.self_attn.q_layernorm", f"{L}.attn.q_norm"),
                      **norm(f"{P}.self_attn.k_layernorm", f"{L}.attn.k_norm")})
    return WeightMap(names)


def phi3_weight_map(spec: ModelSpec) -> WeightMap:
    return WeightMap({
        **llama_model_names(), **llama_layer_names(),
        f"{P}.self_attn.qkv_proj.weight": split_qkv(f"{L}.attn.qkv_proj", "concat"),
        f"{P}.mlp.gate_up_proj.weight": split_parts(f"{L}.mlp.gate_up_proj", ("gate", "up")),
    })


register(Family(
    name="Phi", architectures=("PhiForCausalLM",), build_spec=phi_spec, weight_map=phi_weight_map,
    summary="LayerNorm (optional q/k LayerNorm); partial rotary; parallel, one shared norm; plain GeLU-tanh; "
            "LM head bias"))
register(Family(
    name="Phi-3", architectures=("Phi3ForCausalLM",), build_spec=llama_spec, weight_map=phi3_weight_map,
    summary="RMSNorm; rotary (partial if configured); sequential; gated SiLU from fused qkv_proj/gate_up_proj"))

"""Falcon: 7B (multi-query, parallel residual with one norm), 40B/180B
(new_decoder_architecture: grouped KV heads, ln_attn + ln_mlp), RW (ALiBi, per-head
q/k/v) and the sequential layout (parallel_attn false)."""

from __future__ import annotations

import math

from ..spec import ModelSpec, eos_ids, rope_config
from ..weight_map import WeightMap, fused_qkv, linear, norm, to
from . import Family, register
from .common import check_rope_scaling, refuse

P, L = "transformer.h.{i}", "layers.{i}"


def falcon_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(config["hidden_size"])
    heads = int(config.get("num_attention_heads") or config.get("n_head"))
    head_dim = hidden // heads
    new_arch = bool(config.get("new_decoder_architecture", False))
    multi_query = bool(config.get("multi_query", True))
    if new_arch:
        kv_heads = int(config.get("num_kv_heads") or heads)
    elif multi_query:
        kv_heads = 1
    else:
        kv_heads = heads
    parallel = bool(config.get("parallel_attn", True))
    num_ln = config.get("num_ln_in_parallel_attn") or (2 if new_arch else None)
    refuse(new_arch and not parallel and num_ln != 2,
           "Falcon with new_decoder_architecture, parallel_attn=false and one norm is not a valid layout")
    alibi = bool(config.get("alibi", False))
    theta, scaling = rope_config(config)
    check_rope_scaling(scaling)
    bias = bool(config.get("bias", False))
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config.get("num_hidden_layers") or config.get("n_layer")), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=int(config.get("ffn_hidden_size") or 4 * hidden),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        norm_type="layer", norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        position_type="alibi" if alibi else "rope", rope_theta=theta, rope_scaling=scaling,
        # HF Falcon adds ALiBi to q.k before its 1/sqrt(head_dim) scale.
        alibi_scale=1.0 / math.sqrt(head_dim),
        fused_qkv_layout="grouped" if new_arch else "concat" if multi_query else "per_head",
        qkv_bias=bias, o_bias=bias, mlp_type="plain", activation=config.get("activation", "gelu"), mlp_bias=bias,
        parallel_residual=new_arch or parallel,
        shared_input_norm=not (new_arch and num_ln == 2),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def falcon_weight_map(spec: ModelSpec) -> WeightMap:
    two_norms = spec.parallel_residual and not spec.shared_input_norm
    return WeightMap({
        "transformer.word_embeddings.weight": to("embed.embedding"),
        "lm_head.weight": to("lm_head", linear=True),
        **norm("transformer.ln_f", "final_norm"),
        **norm(f"{P}.input_layernorm", f"{L}.input_norm"),
        **norm(f"{P}.ln_attn", f"{L}.input_norm"),
        **norm(f"{P}.ln_mlp" if two_norms else f"{P}.post_attention_layernorm", f"{L}.pre_mlp_norm"),
        **fused_qkv(f"{P}.self_attention.query_key_value", f"{L}.attn.qkv_proj", spec.fused_qkv_layout),
        **linear(f"{P}.self_attention.dense", f"{L}.attn.o_proj"),
        **linear(f"{P}.mlp.dense_h_to_4h", f"{L}.mlp.up_proj"),
        **linear(f"{P}.mlp.dense_4h_to_h", f"{L}.mlp.down_proj"),
    })


register(Family(
    name="Falcon", architectures=("FalconForCausalLM", "RWForCausalLM"), build_spec=falcon_spec,
    weight_map=falcon_weight_map,
    summary="LayerNorm; rotary or ALiBi (RW); parallel (one or two norms) or sequential; plain GeLU; "
            "MQA (7B), grouped KV (40B/180B)"))

"""InternLM2 / 2.5 (remote code ``InternLM2ForCausalLM``; mapped, never executed): the
Llama computation under its own names, with q/k/v fused per KV head in ``wqkv``
(rows [KVH, G + 2, D]: G queries, then the key, then the value of each group; the
remote code's ``rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + G)``), ``bias`` on
wqkv and wo, SwiGLU ``w1`` (gate) / ``w3`` (up) / ``w2`` (down), linear or dynamic rope
scaling (legacy ``rope_scaling.type``)."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids, rope_config
from ..weight_map import WeightMap, fused_qkv, linear, part, to
from . import Family, register
from .common import check_rope_scaling, refuse

P, L = "model.layers.{i}", "layers.{i}"


def internlm2_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    theta, scaling = rope_config(config)
    check_rope_scaling(scaling)
    refuse(scaling is not None and scaling["rope_type"] not in ("linear", "dynamic"),
           "InternLM2 supports rope_scaling types linear and dynamic only (as its remote code does)")
    bias = bool(config.get("bias", True))  # InternLM2Config's default
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=hidden // heads,
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        norm_type="rms", norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        position_type="rope", rope_theta=theta, rope_scaling=scaling,
        fused_qkv_layout="grouped", qkv_bias=bias, o_bias=bias,
        mlp_type="gated", activation=config.get("hidden_act", "silu"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def internlm2_weight_map(spec: ModelSpec) -> WeightMap:
    mlp = f"{L}.mlp.gate_up_proj"
    return WeightMap({
        "model.tok_embeddings.weight": to("embed.embedding"),
        "model.norm.weight": to("final_norm.scale"),
        "output.weight": to("lm_head", linear=True),
        f"{P}.attention_norm.weight": to(f"{L}.input_norm.scale"),
        f"{P}.ffn_norm.weight": to(f"{L}.pre_mlp_norm.scale"),
        **fused_qkv(f"{P}.attention.wqkv", f"{L}.attn.qkv_proj", "grouped"),
        **linear(f"{P}.attention.wo", f"{L}.attn.o_proj"),
        f"{P}.feed_forward.w1.weight": part(mlp, "gate"),
        f"{P}.feed_forward.w3.weight": part(mlp, "up"),
        **linear(f"{P}.feed_forward.w2", f"{L}.mlp.down_proj"),
    })


register(Family(
    name="InternLM2", architectures=("InternLM2ForCausalLM",), build_spec=internlm2_spec,
    weight_map=internlm2_weight_map,
    summary="RMSNorm; rotary (linear/dynamic scaling); sequential; gated SiLU; q/k/v fused per KV head"))

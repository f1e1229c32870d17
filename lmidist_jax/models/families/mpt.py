"""MPT (MosaicML): ALiBi with alibi_bias_max, LayerNorm without biases, no linear biases,
fused Wqkv (q|k|v), plain exact GeLU with expansion_ratio, optional clip_qkv and qk_ln.

As MosaicML's own (remote) code and vLLM, and unlike transformers' port (which ignores
them: always 8 and 4 * d_model), we honour attn_config.alibi_bias_max and expansion_ratio."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids
from ..weight_map import WeightMap, linear, split_qkv, to
from . import Family, register
from .common import refuse

P, L = "transformer.blocks.{i}", "layers.{i}"


def mpt_spec(config: dict, architecture: str) -> ModelSpec:
    hidden, heads = int(config["d_model"]), int(config["n_heads"])
    attn = config.get("attn_config") or {}
    refuse(not attn.get("alibi", True) or attn.get("rope"), "MPT without ALiBi (learned or rotary positions) "
           "is not supported")
    refuse(attn.get("attn_type", "multihead_attention") != "multihead_attention",
           f"MPT attn_type {attn.get('attn_type')!r} is not supported (only multihead_attention)")
    refuse(bool(attn.get("prefix_lm")), "MPT prefix_lm (bidirectional prefix attention) is not supported")
    refuse(bool(attn.get("qk_gn")), "MPT qk_gn is not supported")
    refuse(not config.get("no_bias", True), "MPT with biases (no_bias=false) is not supported")
    refuse(config.get("logit_scale") is not None, "MPT logit_scale is not supported")
    refuse((config.get("ffn_config") or {}).get("ffn_type", "mptmlp") != "mptmlp",
           "MPT ffn_type other than mptmlp is not supported")
    refuse(config.get("norm_type", "low_precision_layernorm") not in ("low_precision_layernorm", "layernorm"),
           f"MPT norm_type {config.get('norm_type')!r} is not supported")
    softmax_scale = attn.get("softmax_scale")
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["n_layers"]), num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=int(config.get("expansion_ratio", 4) * hidden),
        max_position_embeddings=int(config.get("max_seq_len", 2048)),
        norm_type="layer", norm_eps=float(config.get("layer_norm_epsilon", config.get("norm_eps", 1e-5))),
        norm_bias=False, qk_norm="layer" if attn.get("qk_ln") else None, qk_norm_per_head=False,
        position_type="alibi", alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
        clip_qkv=float(attn["clip_qkv"]) if attn.get("clip_qkv") else None,
        query_scale=None if softmax_scale is None else float(softmax_scale),
        mlp_type="plain", activation="gelu", tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def mpt_weight_map(spec: ModelSpec) -> WeightMap:
    return WeightMap({
        "transformer.wte.weight": to("embed.embedding"),
        "transformer.norm_f.weight": to("final_norm.scale"),
        "lm_head.weight": to("lm_head", linear=True),
        f"{P}.norm_1.weight": to(f"{L}.input_norm.scale"),
        f"{P}.norm_2.weight": to(f"{L}.pre_mlp_norm.scale"),
        f"{P}.attn.Wqkv.weight": split_qkv(f"{L}.attn.qkv_proj", "concat"),
        f"{P}.attn.q_ln.weight": to(f"{L}.attn.q_norm.scale"),
        f"{P}.attn.k_ln.weight": to(f"{L}.attn.k_norm.scale"),
        **linear(f"{P}.attn.out_proj", f"{L}.attn.o_proj"),
        **linear(f"{P}.ffn.up_proj", f"{L}.mlp.up_proj"),
        **linear(f"{P}.ffn.down_proj", f"{L}.mlp.down_proj"),
    })


register(Family(
    name="MPT", architectures=("MptForCausalLM", "MPTForCausalLM"), build_spec=mpt_spec,
    weight_map=mpt_weight_map,
    summary="LayerNorm (no bias); ALiBi (alibi_bias_max); sequential; plain GeLU; clip_qkv, qk_ln"))

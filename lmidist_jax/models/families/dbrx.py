"""DBRX (Databricks): 16 experts, top-4, router weights divided by their p-norm
(moe_normalize_expert_weights), experts stored fused over experts ([E * ffn, d]
matrices w1 / v1 / w2), fused Wqkv (q|k|v) with clip_qkv, LayerNorm without bias, no
biases anywhere, untied head.

Rotary base: DBRX's own code (and vLLM) read ``attn_config.rope_theta`` (500000 in the
released checkpoints); transformers 5.17 ignores it and uses the top-level
``rope_parameters`` (default 10000), a difference from the original model. We take
attn_config's when it is set."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids, rope_config
from ..weight_map import WeightMap, linear, split_qkv, stacked_experts, to
from . import Family, register
from .common import check_rope_scaling, refuse

P, L = "transformer.blocks.{i}", "layers.{i}"


def dbrx_spec(config: dict, architecture: str) -> ModelSpec:
    hidden, heads = int(config["d_model"]), int(config["n_heads"])
    attn = config.get("attn_config") or {}
    ffn = config.get("ffn_config") or {}
    theta, scaling = rope_config(config)
    check_rope_scaling(scaling)
    if attn.get("rope_theta") is not None:
        theta = float(attn["rope_theta"])
    activation = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
    refuse(bool(config.get("tie_word_embeddings")), "DBRX with tie_word_embeddings is not supported")
    norm = ffn.get("moe_normalize_expert_weights", 1.0)
    clip = attn.get("clip_qkv")
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["n_layers"]), num_heads=heads, num_kv_heads=int(attn.get("kv_n_heads", 1)),
        head_dim=hidden // heads, intermediate_size=int(ffn.get("ffn_hidden_size", 3584)),
        max_position_embeddings=int(config.get("max_seq_len", 2048)),
        norm_type="layer", norm_eps=1e-5, norm_bias=False,  # nn.LayerNorm(d_model, bias=False)
        position_type="rope", rope_theta=theta, rope_scaling=scaling,
        clip_qkv=float(clip) if clip is not None else None,
        mlp_type="moe", activation=activation, num_experts=int(ffn.get("moe_num_experts", 4)),
        num_experts_per_token=int(ffn.get("moe_top_k", 1)),
        moe_weight_norm=float(norm) if norm is not None else None,
        tie_word_embeddings=False, bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def dbrx_weight_map(spec: ModelSpec) -> WeightMap:
    experts = f"{P}.ffn.experts.mlp"
    return WeightMap({
        "transformer.wte.weight": to("embed.embedding"),
        "transformer.norm_f.weight": to("final_norm.scale"),
        "lm_head.weight": to("lm_head", linear=True),
        f"{P}.norm_attn_norm.norm_1.weight": to(f"{L}.input_norm.scale"),
        f"{P}.norm_attn_norm.norm_2.weight": to(f"{L}.pre_mlp_norm.scale"),
        f"{P}.norm_attn_norm.attn.Wqkv.weight": split_qkv(f"{L}.attn.qkv_proj", "concat"),
        **linear(f"{P}.norm_attn_norm.attn.out_proj", f"{L}.attn.o_proj"),
        f"{P}.ffn.router.layer.weight": to(f"{L}.mlp.router", linear=True),
        # Each [E * ffn, d]: w1 (gate) and v1 (up) are [out, in] per expert; w2 is used as
        # x @ w2, i.e. already [in (ffn), out (d)] per expert.
        f"{experts}.w1": stacked_experts(f"{L}.mlp.w_gate_up", ("gate",), layout="rows"),
        f"{experts}.v1": stacked_experts(f"{L}.mlp.w_gate_up", ("up",), layout="rows"),
        f"{experts}.w2": stacked_experts(f"{L}.mlp.w_down", layout="rows", weight="kernel"),
    })


register(Family(
    name="DBRX", architectures=("DbrxForCausalLM",), build_spec=dbrx_spec, weight_map=dbrx_weight_map,
    summary="LayerNorm (no bias); rotary; sequential; mixture of gated SiLU experts (softmax, top-k, "
            "p-norm); clip_qkv"))

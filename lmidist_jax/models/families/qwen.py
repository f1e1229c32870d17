"""Qwen (v1, remote code ``QWenLMHeadModel``; mapped, never executed): RMSNorm, rotary
(half-split, first ``rotary_pct`` of each head, base ``rotary_emb_base``), fused ``c_attn``
q | k | v with a bias, SwiGLU ``w2`` (gate) / ``w1`` (up) / ``c_proj`` whose config
``intermediate_size`` is TWICE the real width, ``no_bias`` for c_proj and the MLP.

``use_dynamic_ntk`` (NTK-scaled rotary base) and ``use_logn_attn`` (queries times
log_seq_length(position + 1)) only act beyond ``seq_length``: the NTK alpha is
``max(2 ** ceil(log2(len / seq_length) + 1) - 1, 1)`` = 1 for len <= seq_length, and the
logn factor is 1 there too (modeling_qwen.py QWenModel.get_ntk_alpha, QWenAttention
logn_list). With either set the context is capped to ``seq_length``, where Qwen is the
plain model."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids
from ..weight_map import WeightMap, fused_qkv, linear, norm, part, to
from . import Family, register
from .common import first, refuse

P, L = "transformer.h.{i}", "layers.{i}"


def qwen_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("kv_channels") or hidden // heads)
    # QWenAttention splits c_attn's output at hidden_size and views heads of hidden // heads.
    refuse(head_dim * heads != hidden, f"Qwen with kv_channels x heads ({head_dim} x {heads}) != hidden_size "
                                       f"({hidden}) is not supported (the remote code cannot run it either)")
    refuse(float(config.get("seq_length_expansion") or 1) != 1, "Qwen seq_length_expansion is not supported")
    max_positions = int(config.get("max_position_embeddings", 8192))
    if config.get("use_dynamic_ntk", True) or config.get("use_logn_attn", True):
        max_positions = min(max_positions, int(config.get("seq_length") or max_positions))
    bias = not config.get("no_bias", True)
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        intermediate_size=int(first(config, "intermediate_size", "ffn_hidden_size", default=22016)) // 2,
        max_position_embeddings=max_positions,
        norm_type="rms", norm_eps=float(config.get("layer_norm_epsilon", 1e-6)),
        position_type="rope", rope_theta=float(first(config, "rotary_emb_base", "rope_theta", default=10000)),
        rotary_dim=int(head_dim * float(config.get("rotary_pct", 1.0))),
        fused_qkv_layout="concat", qkv_bias=True, o_bias=bias, mlp_type="gated", activation="silu", mlp_bias=bias,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def qwen_weight_map(spec: ModelSpec) -> WeightMap:
    mlp = f"{L}.mlp.gate_up_proj"
    return WeightMap({
        "transformer.wte.weight": to("embed.embedding"),
        "lm_head.weight": to("lm_head", linear=True),
        **norm("transformer.ln_f", "final_norm"),
        **norm(f"{P}.ln_1", f"{L}.input_norm"),
        **norm(f"{P}.ln_2", f"{L}.pre_mlp_norm"),
        **fused_qkv(f"{P}.attn.c_attn", f"{L}.attn.qkv_proj", "concat"),
        **linear(f"{P}.attn.c_proj", f"{L}.attn.o_proj"),
        # QWenMLP.forward: a1 * F.silu(a2) with a1 = w1(x), a2 = w2(x).
        f"{P}.mlp.w2.weight": part(mlp, "gate"), f"{P}.mlp.w2.bias": part(mlp, "gate", weight="bias"),
        f"{P}.mlp.w1.weight": part(mlp, "up"), f"{P}.mlp.w1.bias": part(mlp, "up", weight="bias"),
        **linear(f"{P}.mlp.c_proj", f"{L}.mlp.down_proj"),
    }, ignore=[r".*\.attn\.(masked_)?bias"])


register(Family(
    name="Qwen", architectures=("QWenLMHeadModel",), build_spec=qwen_spec, weight_map=qwen_weight_map,
    summary="RMSNorm; rotary (context capped to seq_length with dynamic NTK / logn); sequential; "
            "gated SiLU (w2 gate, w1 up)"))

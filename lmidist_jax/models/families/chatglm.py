"""ChatGLM2 / ChatGLM3 / GLM-4 remote code (``ChatGLMModel``, model_type chatglm; mapped,
never executed). Per modeling_chatglm.py: RMSNorm (``rmsnorm``, else LayerNorm); rotary
over the first HALF of each head (``RotaryEmbedding(kv_channels // 2)``) in interleaved
pairs (``x.reshape(..., rot_dim // 2, 2)``), base ``10000 * rope_ratio``, positions
0..seq_length - 1; ``query_key_value`` q | k | v with ``multi_query_group_num`` KV heads
when ``multi_query_attention``, else [heads, 3, D] per head; its bias when
``add_bias_linear or add_qkv_bias``; ``dense_h_to_4h`` [gate | up] SwiGLU."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids
from ..weight_map import WeightMap, fused_qkv, linear, norm, split_parts, to
from . import Family, register
from .common import first, refuse

P, L = "transformer.encoder.layers.{i}", "layers.{i}"


def chatglm_spec(config: dict, architecture: str) -> ModelSpec:
    refuse(bool(config.get("position_encoding_2d")) or "ffn_hidden_size" not in config,
           "ChatGLM-6B (v1: 2D positions, GeLU MLP) is not supported; ChatGLM2/3 and GLM-4 are")
    refuse(bool(config.get("apply_residual_connection_post_layernorm")),
           "ChatGLM with apply_residual_connection_post_layernorm=true is not supported")
    refuse(not config.get("post_layer_norm", True), "ChatGLM without a final norm (post_layer_norm=false) "
                                                    "is not supported")
    refuse(config.get("pre_seq_len") is not None, "ChatGLM P-tuning prefixes (pre_seq_len) are not supported")
    refuse(bool(config.get("quantization_bit")), "ChatGLM's own quantized checkpoints (quantization_bit) are "
                                                 "not supported")
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("kv_channels") or hidden // heads)
    mqa = bool(config.get("multi_query_attention", False))
    linear_bias = bool(config.get("add_bias_linear", False))
    return ModelSpec(
        architecture=architecture, vocab_size=int(first(config, "padded_vocab_size", "vocab_size")),
        hidden_size=hidden, num_layers=int(first(config, "num_layers", "num_hidden_layers")), num_heads=heads,
        num_kv_heads=int(config.get("multi_query_group_num", 1)) if mqa else heads, head_dim=head_dim,
        intermediate_size=int(config["ffn_hidden_size"]),
        max_position_embeddings=int(config.get("seq_length", 2048)),  # the rotary table's length
        norm_type="rms" if config.get("rmsnorm", True) else "layer",
        norm_eps=float(config.get("layernorm_epsilon", 1e-5)),
        position_type="rope", rope_theta=10000.0 * float(config.get("rope_ratio") or 1),
        rotary_dim=head_dim // 2, rope_interleaved=True,
        fused_qkv_layout="concat" if mqa else "per_head",
        qkv_bias=linear_bias or bool(config.get("add_qkv_bias", False)), o_bias=linear_bias,
        mlp_type="gated", activation="silu", mlp_bias=linear_bias,
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def chatglm_weight_map(spec: ModelSpec) -> WeightMap:
    mlp = f"{L}.mlp.gate_up_proj"
    return WeightMap({
        "transformer.embedding.word_embeddings.weight": to("embed.embedding"),
        "transformer.output_layer.weight": to("lm_head", linear=True),
        **norm("transformer.encoder.final_layernorm", "final_norm"),
        **norm(f"{P}.input_layernorm", f"{L}.input_norm"),
        **norm(f"{P}.post_attention_layernorm", f"{L}.pre_mlp_norm"),
        **fused_qkv(f"{P}.self_attention.query_key_value", f"{L}.attn.qkv_proj", spec.fused_qkv_layout),
        **linear(f"{P}.self_attention.dense", f"{L}.attn.o_proj"),
        f"{P}.mlp.dense_h_to_4h.weight": split_parts(mlp, ("gate", "up")),
        f"{P}.mlp.dense_h_to_4h.bias": split_parts(mlp, ("gate", "up"), weight="bias"),
        **linear(f"{P}.mlp.dense_4h_to_h", f"{L}.mlp.down_proj"),
    }, ignore=[r"transformer\.rotary_pos_emb\.inv_freq"])  # a persistent buffer in the remote code


register(Family(
    name="ChatGLM", architectures=("ChatGLMModel", "ChatGLMForConditionalGeneration"),
    build_spec=chatglm_spec, weight_map=chatglm_weight_map,
    summary="RMSNorm; rotary over half of each head, interleaved pairs; sequential; gated SiLU; MQA groups"))

"""BLOOM: ALiBi (standard slopes, added after the 1/sqrt(d) scale), LayerNorm on the
token embeddings, q/k/v fused per head, GeLU (tanh), biases everywhere, tied head."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids
from ..weight_map import WeightMap, fused_qkv, linear, norm, to
from . import Family, register
from .common import first

P, L = "h.{i}", "layers.{i}"


def bloom_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(first(config, "hidden_size", "n_embed"))
    heads = int(first(config, "n_head", "num_attention_heads"))
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(first(config, "n_layer", "num_hidden_layers")), num_heads=heads, num_kv_heads=heads,
        head_dim=hidden // heads, intermediate_size=4 * hidden,
        # ALiBi has no table: the length limit is the engine's max_model_len.
        max_position_embeddings=int(first(config, "seq_length", "max_position_embeddings", default=2048)),
        norm_type="layer", norm_eps=float(config.get("layer_norm_epsilon", 1e-5)), embedding_norm=True,
        residual_from_norm=bool(config.get("apply_residual_connection_post_layernorm", False)),
        position_type="alibi", qkv_bias=True, o_bias=True,
        # bloom_gelu_forward: x/2 (1 + tanh(0.79788456 x (1 + 0.044715 x^2))), the tanh GeLU.
        mlp_type="plain", activation="gelu_pytorch_tanh", mlp_bias=True,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def bloom_weight_map(spec: ModelSpec) -> WeightMap:
    names = {
        "word_embeddings.weight": to("embed.embedding"),
        **norm("word_embeddings_layernorm", "embed_norm"),
        **norm("ln_f", "final_norm"),
        **norm(f"{P}.input_layernorm", f"{L}.input_norm"),
        **norm(f"{P}.post_attention_layernorm", f"{L}.pre_mlp_norm"),
        **fused_qkv(f"{P}.self_attention.query_key_value", f"{L}.attn.qkv_proj", "per_head"),
        **linear(f"{P}.self_attention.dense", f"{L}.attn.o_proj"),
        **linear(f"{P}.mlp.dense_h_to_4h", f"{L}.mlp.up_proj"),
        **linear(f"{P}.mlp.dense_4h_to_h", f"{L}.mlp.down_proj"),
    }
    # BloomForCausalLM saves "transformer.*"; the bigscience/bloom* checkpoints (BloomModel) bare names.
    return WeightMap({**names, **{f"transformer.{name}": target for name, target in names.items()},
                      "lm_head.weight": to("lm_head", linear=True)})


register(Family(
    name="BLOOM", architectures=("BloomForCausalLM",), build_spec=bloom_spec, weight_map=bloom_weight_map,
    summary="LayerNorm (also on the embeddings); ALiBi; sequential; plain GeLU-tanh"))

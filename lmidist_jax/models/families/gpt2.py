"""GPT-2 and StarCoder (GPTBigCode): learned absolute positions, LayerNorm, fused
c_attn (GPT-2: Conv1D [in, 3*out]; GPTBigCode: Linear, MQA or per-head MHA), plain MLP."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids
from ..weight_map import WeightMap, fused_qkv, linear, norm, to
from . import Family, register
from .common import first, refuse

P, L = "transformer.h.{i}", "layers.{i}"


def gpt2_spec(config: dict, architecture: str) -> ModelSpec:
    bigcode = architecture == "GPTBigCodeForCausalLM"
    hidden = int(config["n_embd"])
    heads = int(config["n_head"])
    refuse(bool(config.get("add_cross_attention")), "GPT-2 with cross-attention is not supported")
    kv_heads = 1 if bigcode and config.get("multi_query", True) else heads
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["n_layer"]), num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
        intermediate_size=int(config.get("n_inner") or 4 * hidden),
        max_position_embeddings=int(first(config, "n_positions", "max_position_embeddings", default=1024)),
        norm_type="layer", norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        position_type="learned", qkv_bias=True, o_bias=True,
        query_scale=None if config.get("scale_attn_weights", True) else 1.0,
        scale_by_inverse_layer=bool(config.get("scale_attn_by_inverse_layer_idx", False)) and not bigcode,
        mlp_type="plain", activation=config.get("activation_function", "gelu_new"), mlp_bias=True,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def gpt2_weight_map(spec: ModelSpec) -> WeightMap:
    bigcode = spec.architecture == "GPTBigCodeForCausalLM"
    # GPT-2 stores its projections as Conv1D [in, out]; GPTBigCode as nn.Linear [out, in].
    weight = "linear" if bigcode else "conv1d"
    qkv_layout = "concat" if spec.num_kv_heads != spec.num_heads or not bigcode else "per_head"

    def proj(source, module):  # weight and bias
        if bigcode:
            return linear(source, module)
        return {f"{source}.weight": to(f"{module}.kernel"), f"{source}.bias": to(f"{module}.bias")}

    names = {
        "transformer.wte.weight": to("embed.embedding"),
        "transformer.wpe.weight": to("position_embed"),
        "lm_head.weight": to("lm_head", linear=True),
        **norm("transformer.ln_f", "final_norm"),
        **norm(f"{P}.ln_1", f"{L}.input_norm"),
        **norm(f"{P}.ln_2", f"{L}.pre_mlp_norm"),
        **fused_qkv(f"{P}.attn.c_attn", f"{L}.attn.qkv_proj", qkv_layout, weight=weight),
        **proj(f"{P}.attn.c_proj", f"{L}.attn.o_proj"),
        **proj(f"{P}.mlp.c_fc", f"{L}.mlp.up_proj"),
        **proj(f"{P}.mlp.c_proj", f"{L}.mlp.down_proj"),
    }
    return WeightMap(names, ignore=[r".*\.attn\.(masked_)?bias"])


register(Family(
    name="GPT-2 / StarCoder", architectures=("GPT2LMHeadModel", "GPTBigCodeForCausalLM"),
    build_spec=gpt2_spec, weight_map=gpt2_weight_map,
    summary="LayerNorm; learned absolute positions; sequential; plain GeLU-tanh; StarCoder: MQA"))

"""T5 (v1.0: ReLU MLP, tied head scaled by d_model ** -0.5) and T5 v1.1 / Flan-T5
(gated GeLU, untied head): an encoder-decoder. The encoder is the same layer kind as
the decoder's, run without a cache; each decoder layer adds a cross-attention block
(``decoder.CrossAttention``). Positions are T5's relative buckets, one bias table per
stack, read from its first block. No 1/sqrt(d) query scale; RMS norms without bias."""

from __future__ import annotations

from ..layers import ACTIVATIONS
from ..spec import ModelSpec, eos_ids
from ..weight_map import WeightMap, part, to
from . import Family, register
from .common import refuse


def t5_spec(config: dict, architecture: str) -> ModelSpec:
    # feed_forward_proj "act" or "gated-act", as transformers reads it ("gated-gelu" is GeLU-tanh).
    proj = config.get("feed_forward_proj", "relu")
    pieces = proj.split("-")
    activation = "gelu_new" if proj == "gated-gelu" else pieces[-1]
    refuse(len(pieces) > 2 or (len(pieces) == 2 and pieces[0] != "gated") or activation not in ACTIVATIONS,
           f"T5 feed_forward_proj={proj!r} is not supported; expected 'ACT' or 'gated-ACT' with ACT one of "
           f"{', '.join(sorted(ACTIVATIONS))}")
    mlp_type = "gated" if len(pieces) == 2 else "plain"
    layers = int(config["num_layers"])
    decoder_layers = int(config.get("num_decoder_layers") or layers)
    heads, d_model = int(config["num_heads"]), int(config["d_model"])
    # transformers >= 5 writes scale_decoder_outputs (and always tie_word_embeddings=true,
    # its T5 ties the head); older configs (Flan-T5) say tie_word_embeddings=false for an
    # untied, unscaled head, and omit it (true) for v1.0's tied, scaled one.
    tied = config.get("tie_word_embeddings", True) is not False
    scale_output = config.get("scale_decoder_outputs", tied)
    start = config.get("decoder_start_token_id")
    if start is None:
        start = config.get("pad_token_id", 0)
    return ModelSpec(
        architecture=architecture,
        vocab_size=int(config["vocab_size"]),
        hidden_size=d_model,
        num_layers=decoder_layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=int(config.get("d_kv") or d_model // heads),
        intermediate_size=int(config["d_ff"]),
        # Relative positions have no hard limit; n_positions (512) is T5's trained length.
        max_position_embeddings=int(config.get("n_positions") or 512),
        norm_type="rms",
        norm_eps=float(config.get("layer_norm_epsilon", 1e-6)),
        position_type="relative",
        relative_num_buckets=int(config.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(config.get("relative_attention_max_distance", 128)),
        query_scale=1.0,
        mlp_type=mlp_type,
        activation=activation,
        tie_word_embeddings=tied,
        head_input_scale=d_model ** -0.5 if scale_output else None,
        num_encoder_layers=layers,
        decoder_start_token_id=int(start),
        eos_token_ids=eos_ids(config),
    )


def _block_names(prefix: str, target: str, *, cross: bool, gated: bool) -> dict:
    """One T5 block's checkpoint names: layer.0 self-attention, [layer.1 cross-attention],
    then the feed-forward layer."""
    attn = f"{prefix}.layer.0.SelfAttention"
    names = {f"{prefix}.layer.0.layer_norm.weight": to(f"{target}.input_norm.scale"),
             f"{attn}.o.weight": to(f"{target}.attn.o_proj", linear=True)}
    for slot in "qkv":
        names[f"{attn}.{slot}.weight"] = part(f"{target}.attn.qkv_proj", slot)
    ff = 1
    if cross:
        ff = 2
        cross_attn = f"{prefix}.layer.1.EncDecAttention"
        names.update({
            f"{prefix}.layer.1.layer_norm.weight": to(f"{target}.cross_norm.scale"),
            f"{cross_attn}.q.weight": to(f"{target}.cross_attn.q_proj", linear=True),
            f"{cross_attn}.k.weight": part(f"{target}.cross_attn.kv_proj", "k"),
            f"{cross_attn}.v.weight": part(f"{target}.cross_attn.kv_proj", "v"),
            f"{cross_attn}.o.weight": to(f"{target}.cross_attn.o_proj", linear=True),
        })
    mlp = f"{prefix}.layer.{ff}.DenseReluDense"
    names[f"{prefix}.layer.{ff}.layer_norm.weight"] = to(f"{target}.pre_mlp_norm.scale")
    names[f"{mlp}.wo.weight"] = to(f"{target}.mlp.down_proj", linear=True)
    if gated:
        names[f"{mlp}.wi_0.weight"] = part(f"{target}.mlp.gate_up_proj", "gate")
        names[f"{mlp}.wi_1.weight"] = part(f"{target}.mlp.gate_up_proj", "up")
    else:
        names[f"{mlp}.wi.weight"] = to(f"{target}.mlp.up_proj", linear=True)
    return names


def t5_weight_map(spec: ModelSpec) -> WeightMap:
    gated = spec.mlp_type == "gated"
    names = {
        "shared.weight": to("embed.embedding"),
        "encoder.final_layer_norm.weight": to("encoder_final_norm.scale"),
        "decoder.final_layer_norm.weight": to("final_norm.scale"),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": to("encoder_relative_bias"),
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": to("relative_bias"),
        **_block_names("encoder.block.{i}", "encoder_layers.{i}", cross=False, gated=gated),
        **_block_names("decoder.block.{i}", "layers.{i}", cross=True, gated=gated),
    }
    if not spec.tie_word_embeddings:
        names["lm_head.weight"] = to("lm_head", linear=True)
    # Copies of shared.weight that some checkpoints also store; an unused cross-attention
    # bias table that old checkpoints carry (transformers ignores it too).
    ignore = [r"(encoder|decoder)\.embed_tokens\.weight",
              r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"]
    if spec.tie_word_embeddings:
        ignore.append(r"lm_head\.weight")  # transformers >= 5 may save the tied head
    return WeightMap(names, ignore=ignore)


register(Family(
    name="T5", architectures=("T5ForConditionalGeneration",),
    build_spec=t5_spec, weight_map=t5_weight_map,
    summary="RMSNorm (no mean, no bias); relative position buckets; encoder-decoder; ReLU or gated GeLU"))

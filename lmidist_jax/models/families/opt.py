"""OPT: learned positions (row = position + 2), LayerNorm, ReLU, biases (enable_bias);
pre-LN (125m, 1.3b+) or post-LN without a final norm (350m, do_layer_norm_before=false);
350m's narrower embeddings with project_in/project_out (word_embed_proj_dim); tied head."""

from __future__ import annotations

from ..spec import ModelSpec, eos_ids
from ..weight_map import WeightMap, linear, norm, part, to
from . import Family, register

P, L = "decoder.layers.{i}", "layers.{i}"


def opt_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    pre_norm = bool(config.get("do_layer_norm_before", True))
    bias = bool(config.get("enable_bias", True))
    word_embed = int(config.get("word_embed_proj_dim") or hidden)
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=int(config["ffn_dim"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        # nn.LayerNorm's default eps; the config has none.
        norm_type="layer", norm_eps=1e-5, norm_affine=bool(config.get("layer_norm_elementwise_affine", True)),
        post_norm=not pre_norm,
        # OPTDecoder builds final_layer_norm only for pre-LN models without _remove_final_layer_norm.
        final_norm=pre_norm and not config.get("_remove_final_layer_norm", False),
        position_type="learned", position_offset=2,
        qkv_bias=bias, o_bias=bias, mlp_type="plain", activation=config.get("activation_function", "relu"),
        mlp_bias=bias, word_embed_size=word_embed if word_embed != hidden else None,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def opt_weight_map(spec: ModelSpec) -> WeightMap:
    names = {
        "decoder.embed_tokens.weight": to("embed.embedding"),
        "decoder.embed_positions.weight": to("position_embed"),
        "decoder.project_in.weight": to("project_in", linear=True),
        "decoder.project_out.weight": to("project_out", linear=True),
        **norm("decoder.final_layer_norm", "final_norm"),
        **norm(f"{P}.self_attn_layer_norm", f"{L}.input_norm"),
        **norm(f"{P}.final_layer_norm", f"{L}.pre_mlp_norm"),
        **linear(f"{P}.self_attn.out_proj", f"{L}.attn.o_proj"),
        **linear(f"{P}.fc1", f"{L}.mlp.up_proj"),
        **linear(f"{P}.fc2", f"{L}.mlp.down_proj"),
    }
    for slot in "qkv":
        names[f"{P}.self_attn.{slot}_proj.weight"] = part(f"{L}.attn.qkv_proj", slot)
        names[f"{P}.self_attn.{slot}_proj.bias"] = part(f"{L}.attn.qkv_proj", slot, weight="bias")
    # OPTForCausalLM saves "model.decoder.*"; the facebook/opt-* checkpoints (OPTModel) "decoder.*".
    rules = {**names, **{f"model.{name}": target for name, target in names.items()},
             "lm_head.weight": to("lm_head", linear=True)}
    # Post-LN OPT has no final norm: transformers drops a checkpoint's one unused, so do we.
    ignore = [] if spec.final_norm else [r"(model\.)?decoder\.final_layer_norm\.(weight|bias)"]
    return WeightMap(rules, ignore=ignore)


register(Family(
    name="OPT", architectures=("OPTForCausalLM",), build_spec=opt_spec, weight_map=opt_weight_map,
    summary="LayerNorm; learned absolute positions (offset 2); sequential pre-LN, or post-LN (350m) "
            "with project_in/out; plain ReLU"))

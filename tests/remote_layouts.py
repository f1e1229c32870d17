"""Checkpoints in the layouts of remote-code families (Qwen v1, InternLM2, ChatGLM2/3),
written from a transformers-native model holding the same weights (the oracle).

No remote code is downloaded or run: each writer renames/fuses the tensors that
``save_pretrained`` wrote into the names and packings the remote modeling files use, and
replaces config.json with the remote config's own fields. ``tests/tiny_models.py`` calls a
writer as ``writer(hf_model, directory)`` right after ``save_pretrained``.

Facts each packing follows (read in the public remote modeling files):
  Qwen      modeling_qwen.py: ``c_attn`` = [q | k | v] rows, ``mixed_x_layer.split(hidden_size)``;
            ``QWenMLP.forward``: ``a1 * F.silu(a2)``, a1 = w1(x) (up), a2 = w2(x) (gate);
            ``w1``/``w2`` have ``intermediate_size // 2`` outputs (the config holds twice the width).
  InternLM2 modeling_internlm2.py: ``rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + G)``, queries
            ``[..., :G, :]``, key ``[..., -2, :]``, value ``[..., -1, :]`` => rows [KVH, G + 2, D];
            ``w2(act(w1(x)) * w3(x))``.
  ChatGLM   modeling_chatglm.py: multi_query_attention: ``split([H*D, KVH*D, KVH*D])`` => [q | k | v];
            otherwise ``view(..., H, 3 * D)`` + chunk(3) => [H, 3, D]; ``swiglu``: chunk(2) =>
            silu(first) * second, the same [gate | up] as GLM's gate_up_proj.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file


def _sizes(config):
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, config.num_key_value_heads or heads, head_dim


def _native_layers(directory, config):
    """(non-layer tensors, one dict per layer) under Llama's short names: q k v o gate up down
    (+ ``_bias``), ln1, ln2; embed, norm, lm_head. Phi-3's fused tensors are split."""
    sd = load_file(os.path.join(directory, "model.safetensors"))
    heads, kv_heads, d = _sizes(config)
    top = {"embed": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"]}
    if "lm_head.weight" in sd:
        top["lm_head"] = sd["lm_head.weight"]
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        t = {"ln1": sd[p + "input_layernorm.weight"], "ln2": sd[p + "post_attention_layernorm.weight"]}
        if p + "self_attn.qkv_proj.weight" in sd:
            t["q"], t["k"], t["v"] = torch.split(sd[p + "self_attn.qkv_proj.weight"],
                                                 [heads * d, kv_heads * d, kv_heads * d])
        if p + "mlp.gate_up_proj.weight" in sd:
            t["gate"], t["up"] = sd[p + "mlp.gate_up_proj.weight"].chunk(2)
        for short, name in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                            ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                            ("down", "mlp.down_proj")):
            for suffix, key in (("weight", short), ("bias", short + "_bias")):
                if f"{p}{name}.{suffix}" in sd:
                    t[key] = sd[f"{p}{name}.{suffix}"]
        layers.append(t)
    return top, layers


def _write(directory, tensors, config_json):
    os.remove(os.path.join(directory, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2)


def _rope(config):
    params = dict(getattr(config, "rope_parameters", None) or {})
    return float(params.get("rope_theta", 10000.0)), params


def _qkv(t, key):
    return torch.cat([t[f"q{key}"], t[f"k{key}"], t[f"v{key}"]])


def write_qwen(model, directory, *, seq_length=None, dynamic_ntk=False, logn=False):
    """Qwen v1. Oracles: Qwen2 (MHA, q/k/v bias), Llama (attention_bias + mlp_bias: no_bias=false),
    Phi-3 (partial rotary; no q/k/v bias, so c_attn's bias is written as zeros)."""
    config = model.config
    top, layers = _native_layers(directory, config)
    theta, params = _rope(config)
    tensors = {"transformer.wte.weight": top["embed"], "transformer.ln_f.weight": top["norm"]}
    if "lm_head" in top:
        tensors["lm_head.weight"] = top["lm_head"]
    biased = "o_bias" in layers[0]
    for i, t in enumerate(layers):
        p = f"transformer.h.{i}."
        qkv_bias = _qkv(t, "_bias") if "q_bias" in t else torch.zeros(_qkv(t, "").shape[0])
        tensors.update({p + "ln_1.weight": t["ln1"], p + "ln_2.weight": t["ln2"],
                        p + "attn.c_attn.weight": _qkv(t, ""), p + "attn.c_attn.bias": qkv_bias,
                        p + "attn.c_proj.weight": t["o"], p + "mlp.w2.weight": t["gate"],
                        p + "mlp.w1.weight": t["up"], p + "mlp.c_proj.weight": t["down"]})
        if biased:
            tensors.update({p + "attn.c_proj.bias": t["o_bias"], p + "mlp.w2.bias": t["gate_bias"],
                            p + "mlp.w1.bias": t["up_bias"], p + "mlp.c_proj.bias": t["down_bias"]})
    heads, _, head_dim = _sizes(config)
    _write(directory, tensors, {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": heads, "kv_channels": head_dim,
        "intermediate_size": 2 * config.intermediate_size, "layer_norm_epsilon": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "seq_length": seq_length or config.max_position_embeddings,
        "rotary_emb_base": theta, "rotary_pct": float(params.get("partial_rotary_factor", 1.0)),
        "no_bias": not biased, "use_dynamic_ntk": dynamic_ntk, "use_logn_attn": logn,
        "tie_word_embeddings": bool(config.tie_word_embeddings), "bf16": False, "fp16": False, "fp32": True,
        "use_flash_attn": "auto", "torch_dtype": "float32"})


def write_internlm2(model, directory):
    """InternLM2. Oracle: Llama (attention_bias = InternLM2's ``bias`` on wqkv and wo)."""
    config = model.config
    top, layers = _native_layers(directory, config)
    heads, kv_heads, d = _sizes(config)
    group = heads // kv_heads

    def grouped(q, k, v):  # [KVH, G + 2, D, ...] rows
        rest = q.shape[1:]
        return torch.cat([q.reshape(kv_heads, group, d, *rest), k.reshape(kv_heads, 1, d, *rest),
                          v.reshape(kv_heads, 1, d, *rest)], dim=1).reshape(-1, *rest)

    tensors = {"model.tok_embeddings.weight": top["embed"], "model.norm.weight": top["norm"]}
    if "lm_head" in top:
        tensors["output.weight"] = top["lm_head"]
    bias = "q_bias" in layers[0]
    for i, t in enumerate(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "attention_norm.weight": t["ln1"], p + "ffn_norm.weight": t["ln2"],
                        p + "attention.wqkv.weight": grouped(t["q"], t["k"], t["v"]),
                        p + "attention.wo.weight": t["o"], p + "feed_forward.w1.weight": t["gate"],
                        p + "feed_forward.w3.weight": t["up"], p + "feed_forward.w2.weight": t["down"]})
        if bias:
            tensors[p + "attention.wqkv.bias"] = grouped(t["q_bias"], t["k_bias"], t["v_bias"])
            tensors[p + "attention.wo.bias"] = t["o_bias"]
    theta, params = _rope(config)
    scaling = None
    if params.get("rope_type", "default") != "default":
        scaling = {"type": params["rope_type"], "factor": params["factor"]}  # the legacy key the remote code reads
    _write(directory, tensors, {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.rms_norm_eps,
        "bias": bias, "rope_theta": theta, "rope_scaling": scaling,
        "tie_word_embeddings": bool(config.tie_word_embeddings), "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
        "attn_implementation": "eager", "torch_dtype": "float32"})


def write_chatglm(model, directory):
    """ChatGLM2/3. Oracle: GLM (``GlmForCausalLM``) with partial_rotary_factor 0.5 and no o_proj/MLP
    biases. Why GLM's rotary is ChatGLM's: GLM (modeling_glm.py ``apply_rotary_pos_emb``) rotates the
    first ``int(head_dim * 0.5)`` dims, pairs (x[2j], x[2j+1]) (``rotate_half``: ``x[..., 0::2]``,
    ``x[..., 1::2]``, cos/sin ``repeat_interleave(2)``), inv_freq = 1 / theta^(arange(0, dim, 2) / dim)
    with dim = head_dim / 2. ChatGLM (modeling_chatglm.py) builds ``RotaryEmbedding(kv_channels // 2)``:
    theta_i = 1 / (10000 * rope_ratio)^(arange(0, n_elem, 2) / n_elem), n_elem = head_dim / 2, and
    ``apply_rotary_pos_emb`` rotates ``x[..., :rot_dim]`` reshaped (rot_dim // 2, 2): the same pairs,
    the same frequencies, base = 10000 * rope_ratio. So rope_ratio = GLM rope_theta / 10000."""
    config = model.config
    theta, params = _rope(config)
    assert float(params.get("partial_rotary_factor", 0.5)) == 0.5 and not config.tie_word_embeddings
    top, layers = _native_layers(directory, config)
    heads, kv_heads, d = _sizes(config)
    mqa = kv_heads != heads

    def packed(q, k, v):  # q | k | v (multi-query), else [H, 3, D] rows
        if mqa:
            return torch.cat([q, k, v])
        rest = q.shape[1:]
        return torch.stack([x.reshape(heads, d, *rest) for x in (q, k, v)], dim=1).reshape(-1, *rest)

    rot = d // 2
    tensors = {"transformer.embedding.word_embeddings.weight": top["embed"],
               "transformer.encoder.final_layernorm.weight": top["norm"],
               "transformer.output_layer.weight": top["lm_head"],
               # A persistent buffer of the remote RotaryEmbedding (real checkpoints carry it).
               "transformer.rotary_pos_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))}
    qkv_bias = "q_bias" in layers[0]
    for i, t in enumerate(layers):
        p = f"transformer.encoder.layers.{i}."
        tensors.update({p + "input_layernorm.weight": t["ln1"], p + "post_attention_layernorm.weight": t["ln2"],
                        p + "self_attention.query_key_value.weight": packed(t["q"], t["k"], t["v"]),
                        p + "self_attention.dense.weight": t["o"],
                        p + "mlp.dense_h_to_4h.weight": torch.cat([t["gate"], t["up"]]),
                        p + "mlp.dense_4h_to_h.weight": t["down"]})
        if qkv_bias:
            tensors[p + "self_attention.query_key_value.bias"] = packed(t["q_bias"], t["k_bias"], t["v_bias"])
    _write(directory, tensors, {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "num_layers": config.num_hidden_layers, "padded_vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "ffn_hidden_size": config.intermediate_size, "kv_channels": d,
        "num_attention_heads": heads, "seq_length": config.max_position_embeddings,
        "layernorm_epsilon": config.rms_norm_eps, "rmsnorm": True, "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False, "add_bias_linear": False, "add_qkv_bias": qkv_bias,
        "multi_query_attention": mqa, "multi_query_group_num": kv_heads, "rope_ratio": theta / 10000.0,
        "original_rope": True, "tie_word_embeddings": False, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "torch_dtype": "float32"})

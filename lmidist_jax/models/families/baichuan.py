"""Baichuan (remote code; mapped, never executed): the Llama layout with q/k/v packed in
one W_pack ([q | k | v] rows), RMSNorm, gated SiLU, untied head.

Which one a checkpoint is, by the rules vLLM uses (its models/baichuan.py):
  * BaiChuanForCausalLM (Baichuan-7B): rotary.
  * BaichuanForCausalLM: rotary when hidden_size == 4096 (Baichuan2-7B), else ALiBi with
    the standard slopes added after the 1/sqrt(d) scale (Baichuan-13B, Baichuan2-13B).
  * vocab_size == 125696 is Baichuan2 (Baichuan 1 has 64000): its NormHead scales every
    lm_head row to unit L2 norm before use (eval mode, first forward), done here at load.
"""

from __future__ import annotations

import numpy as np

from ..spec import ModelSpec, eos_ids, rope_config
from ..weight_map import WeightMap, split_qkv, to
from . import Family, register
from .common import check_rope_scaling, first, llama_layer_names, llama_model_names

BAICHUAN2_VOCAB = 125696


def baichuan_spec(config: dict, architecture: str) -> ModelSpec:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    rope = architecture == "BaiChuanForCausalLM" or hidden == 4096
    theta, scaling = rope_config(config)
    check_rope_scaling(scaling)
    return ModelSpec(
        architecture=architecture, vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(first(config, "max_position_embeddings", "model_max_length", default=4096)),
        norm_type="rms", norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        position_type="rope" if rope else "alibi", rope_theta=theta, rope_scaling=scaling,
        mlp_type="gated", activation=config.get("hidden_act", "silu"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"), eos_token_ids=eos_ids(config))


def unit_rows(target):
    """``target`` given the matrix with each row divided by its L2 norm (as
    torch.nn.functional.normalize: by max(norm, 1e-12)), computed in float32."""
    def emit(array, spec, groups):
        rows = np.asarray(array, np.float32)
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return target(rows, spec, groups)
    return emit


def baichuan_weight_map(spec: ModelSpec) -> WeightMap:
    names = {**llama_model_names(), **llama_layer_names(),
             "model.layers.{i}.self_attn.W_pack.weight": split_qkv("layers.{i}.attn.qkv_proj", "concat")}
    if spec.vocab_size == BAICHUAN2_VOCAB:
        names["lm_head.weight"] = unit_rows(to("lm_head", linear=True))
    return WeightMap(names, ignore=[r".*rotary_emb\.(cos|sin)_cached"])


register(Family(
    name="Baichuan", architectures=("BaiChuanForCausalLM", "BaichuanForCausalLM"), build_spec=baichuan_spec,
    weight_map=baichuan_weight_map,
    summary="RMSNorm; rotary (7B) or ALiBi (13B); sequential; gated SiLU; Baichuan2: normalized LM head"))

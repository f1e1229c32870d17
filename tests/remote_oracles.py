"""Oracles for checkpoints whose own modeling code is not transformers':

* ``write_baichuan``: a Baichuan (remote code) checkpoint written from a Llama model (the
  oracle) holding the same weights; a writer for ``tiny_models.make_model`` (5th element).
* ``DeciLMForCausalLM`` + ``write_decilm``: DeciLM-7B's variable GQA as transformers' Llama
  layers, each built with its own layer's KV-head count.
* ``MPTForCausalLM``: transformers' MPT made to compute what MosaicML's own modeling code
  (llm-foundry ``llmfoundry/models/layers/attention.py``, ``mpt/modeling_mpt.py``) computes
  for the config fields the port ignores.

Facts (public remote modeling files, read, not run):
  Baichuan  modeling_baichuan.py: ``W_pack = nn.Linear(hidden, 3 * hidden, bias=False)``, its output
            ``unflatten(-1, (3, hidden_size))`` => rows [q | k | v]; RMSNorm, ``down(act(gate(x)) * up(x))``;
            Baichuan2's ``NormHead.forward`` (eval): ``self.weight.data = F.normalize(self.weight)`` once.
  DeciLM    configuration_decilm.py: ``DeciLMConfig(LlamaConfig)`` + ``num_key_value_heads_per_layer``,
            model_type "deci"; modeling_decilm.py: ``DeciLMAttention`` is Llama's attention with
            ``num_key_value_heads = config.num_key_value_heads_per_layer[layer_idx]``; names are Llama's.
  MPT       ``gen_slopes(n_heads, alibi_bias_max)`` with the config's ``alibi_bias_max`` (transformers:
            ``build_mpt_alibi_tensor(num_heads, max_seq_len)``, always 8); ``ffn`` width
            ``expansion_ratio * d_model`` (transformers: ``4 * hidden_size``); ``qk_ln``: after
            ``clip_qkv``'s clamp, ``q_ln``/``k_ln`` = LayerNorm over ``n_heads * head_dim`` (not per
            head; ``qk_gn`` is the per-head one), bias removed by ``no_bias`` (transformers: no qk_ln).
"""

from __future__ import annotations

import copy
import functools
import json
import os

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor


def write_baichuan(model, directory, *, architecture="BaiChuanForCausalLM", normhead=False):
    """Baichuan from an MHA Llama without biases: q/k/v_proj fused into W_pack. ``normhead``
    (Baichuan2, vocab 125696): the oracle's lm_head rows are normalized in place and the
    checkpoint gets them rescaled by random positive factors, which Baichuan2's NormHead (so
    the engine) must undo."""
    config = model.config
    assert config.num_key_value_heads == config.num_attention_heads and not config.attention_bias
    assert (config.vocab_size == 125696) == normhead and not config.tie_word_embeddings
    path = os.path.join(directory, "model.safetensors")
    sd = load_file(path)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        sd[p + "W_pack.weight"] = torch.cat([sd.pop(p + f"{s}_proj.weight") for s in "qkv"])
    if normhead:
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.nn.functional.normalize(model.lm_head.weight))
            scale = 0.5 + 2 * torch.rand(config.vocab_size, 1, generator=torch.Generator().manual_seed(0))
            sd["lm_head.weight"] = model.lm_head.weight.detach().clone() * scale
    os.remove(path)
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
    length = {"max_position_embeddings" if architecture == "BaiChuanForCausalLM" else "model_max_length":
              config.max_position_embeddings}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": [architecture], "model_type": "baichuan",
                   "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                                "AutoModelForCausalLM": f"modeling_baichuan.{architecture}"},
                   "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
                   "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
                   "num_attention_heads": config.num_attention_heads, "hidden_act": config.hidden_act,
                   "rms_norm_eps": config.rms_norm_eps, **length, "bos_token_id": config.bos_token_id,
                   "eos_token_id": config.eos_token_id, "pad_token_id": 0, "tie_word_embeddings": False,
                   "torch_dtype": "float32"}, f, indent=2)


class MPTForCausalLM(transformers.MptForCausalLM):
    """MptForCausalLM with attn_config.alibi_bias_max, expansion_ratio and qk_ln as MosaicML's
    code applies them (see the module docstring). Named as the remote class, so config.json
    says ``"architectures": ["MPTForCausalLM"]``; the saved tensor names are the remote ones
    (``transformer.blocks.N.attn.q_ln.weight``)."""

    def __init__(self, config):
        super().__init__(config)
        attn, hidden = config.attn_config, config.hidden_size
        self.transformer.build_mpt_alibi_tensor = functools.partial(
            build_mpt_alibi_tensor, alibi_bias_max=attn.alibi_bias_max)
        inner = config.expansion_ratio * hidden
        for block in self.transformer.blocks:
            block.ffn.up_proj = torch.nn.Linear(hidden, inner, bias=False)
            block.ffn.down_proj = torch.nn.Linear(inner, hidden, bias=False)
            if attn.qk_ln:
                a = block.attn
                a.q_ln = torch.nn.LayerNorm(hidden, eps=config.layer_norm_epsilon, bias=False)
                a.k_ln = torch.nn.LayerNorm(hidden, eps=config.layer_norm_epsilon, bias=False)
                a.Wqkv.register_forward_hook(functools.partial(_clip_then_qk_ln, a, a.clip_qkv))
                a.clip_qkv = None  # clamped in the hook, before the norms (transformers would clamp after)


def _clip_then_qk_ln(attn, clip, module, args, out):
    if clip:
        out = out.clamp(min=-clip, max=clip)
    q, k, v = out.chunk(3, dim=-1)
    return torch.cat([attn.q_ln(q), attn.k_ln(k), v], dim=-1)


class DeciLMForCausalLM(transformers.LlamaForCausalLM):
    """Llama whose layer i has ``config.num_key_value_heads_per_layer[i]`` KV heads (what
    DeciLM's remote ``DeciLMAttention`` does); built from transformers' own Llama layers."""

    def __init__(self, config):
        super().__init__(config)
        for i, kv_heads in enumerate(config.num_key_value_heads_per_layer):
            layer_config = copy.deepcopy(config)
            layer_config.num_key_value_heads = kv_heads
            self.model.layers[i] = LlamaDecoderLayer(layer_config, i)
        self.post_init()


def write_decilm(model, directory):
    """config.json as DeciLM-7B's: remote architecture and model_type, the per-layer list;
    the tensors keep Llama's names (as DeciLM's)."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(architectures=["DeciLMForCausalLM"], model_type="deci",
                  auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig",
                            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
                  num_key_value_heads=max(model.config.num_key_value_heads_per_layer),
                  num_key_value_heads_per_layer=list(model.config.num_key_value_heads_per_layer))
    with open(path, "w") as f:
        json.dump(config, f, indent=2)

"""Tiny random HF models saved to disk, built with transformers (torch is the oracle)."""

from __future__ import annotations

import json
import os

import torch
import transformers

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)

# family -> (config class, model class, config overrides, architecture written to config.json)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}, None),
    "llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(num_key_value_heads=1, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 32}), None),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=8), None),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(num_key_value_heads=4), None),
    # InternLM (remote code upstream) is the Llama layout with biases on q/k/v/o: the HF
    # oracle is Llama with attention_bias, the checkpoint says InternLMForCausalLM.
    "internlm": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(attention_bias=True),
                 "InternLMForCausalLM"),
}

# ---------------------------------------------------------------------------------------------
# Families the engine does not support yet (the parity test iterates FAMILIES only).
# Their config classes spell the sizes differently, so each entry carries a complete config in
# the family's own field names (COMMON is not merged in: a stray key such as num_key_value_heads
# on a FalconConfig would be written to config.json and mislead a loader). Sizes follow COMMON:
# hidden 64, 4 heads, vocab 128, max positions 512, 2 layers (3 where layer kinds alternate).
# bos/eos are put inside the 128-token vocabulary. See FAMILY_NOTES.md for what each covers.
# ---------------------------------------------------------------------------------------------
# initializer_range 0.1 (HF default 0.02): with 0.02 the attention of a tiny model is nearly
# uniform, and dropping partial rotary, a rope base, a softcap or 1/(layer_idx+1) changes the
# logits by less than the parity test's 1e-4 tolerance; with 0.1 each changes them by > 1e-2.
_TOKENS = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
# GPT-2 / GPTBigCode names (hidden_size etc. are attribute_map aliases of these).
_GPT2 = dict(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512, **_TOKENS)
# GPT-NeoX, Gemma*, Phi, Phi-3, StarCoder2 use the Llama names.
_LLAMA_NAMES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=512, **_TOKENS)
# Falcon: ffn_hidden_size (None -> 4*hidden), num_kv_heads (only read by new_decoder_architecture
# or multi_query=False), no intermediate_size / num_key_value_heads fields.
_FALCON = dict(hidden_size=64, ffn_hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=512, **_TOKENS)
_G3_LAYERS = ["sliding_attention", "sliding_attention", "full_attention"]


def _neox(**kw):
    return {**_LLAMA_NAMES, **kw}


def _gemma(**kw):
    return {**_LLAMA_NAMES, "pad_token_id": 0, **kw}


def _phi3(**kw):
    # Phi3Config's default pad_token_id (32000) is an nn.Embedding padding_idx: out of range here.
    return {**_LLAMA_NAMES, "pad_token_id": 0, **kw}


def _falcon(**kw):
    return {**_FALCON, **kw}


def _gpt2(**kw):
    return {**_GPT2, **kw}


_T = transformers
NEW_FAMILIES = {
    # GPT-2: learned positions, Conv1D [in, out] weights, fused c_attn q|k|v, tied head.
    "gpt2": (_T.GPT2Config, _T.GPT2LMHeadModel, _gpt2(), None),
    # untied head, n_inner=None (-> 4*n_embd = 256), exact-erf gelu.
    "gpt2_untied": (_T.GPT2Config, _T.GPT2LMHeadModel,
                    _gpt2(n_inner=None, tie_word_embeddings=False, activation_function="gelu"), None),
    # Stanford-CRFM style: scores also divided by (layer_idx + 1); reorder_and_upcast_attn is
    # numerically the same scaling (eager only). 3 layers so the 1/(i+1) factors differ.
    "gpt2_layerscale": (_T.GPT2Config, _T.GPT2LMHeadModel,
                        _gpt2(n_layer=3, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
                        None),
    # GPT-NeoX / Pythia: parallel residual (two norms), partial rotary 0.25, fused qkv [heads, 3, d].
    "neox": (_T.GPTNeoXConfig, _T.GPTNeoXForCausalLM,
             _neox(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
             None),
    # sequential residual, full rotary, different base, no biases, tied head.
    "neox_seq": (_T.GPTNeoXConfig, _T.GPTNeoXForCausalLM,
                 _neox(use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0}),
                 None),
    # Gemma: (1+w) RMSNorm, sqrt(hidden) embedding scale, MQA, head_dim 32 != 64/4, tied.
    "gemma": (_T.GemmaConfig, _T.GemmaForCausalLM, _gemma(num_key_value_heads=1, head_dim=32), None),
    # Gemma 2: sandwich norms, sliding(8)/full alternation, scalar 24 != head_dim, both softcaps
    # (small caps so that they bite on a tiny model). eager: sdpa silently drops the attention softcap.
    "gemma2": (_T.Gemma2Config, _T.Gemma2ForCausalLM,
               _gemma(num_hidden_layers=3, num_key_value_heads=2, head_dim=32, sliding_window=8,
                      query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                      attn_implementation="eager"),
               None),
    # Gemma 3 (4B+ style): q/k (1+w) RMSNorms, layers sliding, sliding, full; local base 10k vs
    # global 1M with linear scaling 8 on global layers only; no softcaps.
    "gemma3": (_T.Gemma3TextConfig, _T.Gemma3ForCausalLM,
               _gemma(num_hidden_layers=3, num_key_value_heads=2, head_dim=32, sliding_window=8,
                      query_pre_attn_scalar=24, layer_types=_G3_LAYERS,
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                          "rope_theta": 1000000.0}}),
               None),
    # Gemma 3 1B style: MQA, no rope scaling, final softcap set (honoured), head_dim 8 < 16.
    "gemma3_1b": (_T.Gemma3TextConfig, _T.Gemma3ForCausalLM,
                  _gemma(num_hidden_layers=3, num_key_value_heads=1, head_dim=8, sliding_window=8,
                         query_pre_attn_scalar=8, layer_types=_G3_LAYERS, final_logit_softcapping=3.0,
                         rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                          "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
                  None),
    # Phi-1/1.5/2: parallel residual with ONE shared LayerNorm, partial rotary 0.5, lm_head bias.
    "phi": (_T.PhiConfig, _T.PhiForCausalLM, _neox(partial_rotary_factor=0.5), None),
    # qk_layernorm (LayerNorm over head_dim, with bias), GQA, rotary 0.75.
    "phi_qkln": (_T.PhiConfig, _T.PhiForCausalLM,
                 _neox(num_key_value_heads=2, qk_layernorm=True, partial_rotary_factor=0.75), None),
    # Phi-3: fused qkv_proj q|k|v and gate_up_proj gate|up, RMSNorm, GQA.
    "phi3": (_T.Phi3Config, _T.Phi3ForCausalLM, _phi3(num_key_value_heads=2), None),
    # Phi-3 with a sliding window of 8 on every layer, MHA, partial rotary 0.5 (Phi-4-mini style).
    "phi3_window": (_T.Phi3Config, _T.Phi3ForCausalLM,
                    _phi3(num_key_value_heads=4, sliding_window=8,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.5}),
                    None),
    # Phi-3 longrope ("su"): short factors while the sequence is <= 32 tokens, long factors (and a
    # cos/sin scale sqrt(1 + ln(512/32)/ln(32))) for the WHOLE sequence once it is longer.
    "phi3_longrope": (_T.Phi3Config, _T.Phi3ForCausalLM,
                      _phi3(num_key_value_heads=2, original_max_position_embeddings=32,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                             "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                                             "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]}),
                      None),
    # Falcon-7B: multi_query (1 kv head, qkv rows q-heads | k | v), parallel attn+MLP sharing
    # input_layernorm, no biases, tied.
    "falcon7b_mqa": (_T.FalconConfig, _T.FalconForCausalLM,
                     _falcon(multi_query=True, parallel_attn=True, new_decoder_architecture=False), None),
    # Falcon-40B/180B: new_decoder_architecture, grouped qkv rows [kv, q-per-kv + 2, d], two
    # norms (ln_attn, ln_mlp), GQA 4/2, untied.
    "falcon40b_newarch": (_T.FalconConfig, _T.FalconForCausalLM,
                          _falcon(new_decoder_architecture=True, num_kv_heads=2, tie_word_embeddings=False),
                          None),
    # Falcon2-11B: new_decoder_architecture with num_ln_in_parallel_attn=1 (one shared norm), GQA 4/2.
    "falcon11b_1ln": (_T.FalconConfig, _T.FalconForCausalLM,
                      _falcon(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1), None),
    # Falcon-RW: alibi (no rotary), multi_query=False (qkv rows [heads, 3, d]), sequential, biases.
    # 12 heads of dim 4 (hidden 48): non-power-of-2 slopes, and slopes that bf16 rounds.
    "falcon_rw_alibi_12h": (_T.FalconConfig, _T.FalconForCausalLM,
                        _falcon(hidden_size=48, num_attention_heads=12, ffn_hidden_size=None, alibi=True,
                                multi_query=False, parallel_attn=False, bias=True),
                        None),
    # The same with 8 heads of 8 (power-of-two slopes: transformers' bfloat16 rounding is exact).
    "falcon_rw_alibi": (_T.FalconConfig, _T.FalconForCausalLM,
                        _falcon(num_attention_heads=8, alibi=True, multi_query=False, parallel_attn=False,
                                bias=True),
                        None),
    # parallel_attn=False with rotary and the [heads, 3, d] MHA layout.
    "falcon_seq": (_T.FalconConfig, _T.FalconForCausalLM,
                   _falcon(multi_query=False, parallel_attn=False), None),
    # StarCoder / SantaCoder: GPT-2 layout with nn.Linear weights; MQA c_attn rows q | k | v.
    "starcoder_mqa": (_T.GPTBigCodeConfig, _T.GPTBigCodeForCausalLM, _gpt2(multi_query=True), None),
    # multi_query=False: c_attn rows are [heads, 3, d] (NOT q|k|v), untied.
    "starcoder_mha": (_T.GPTBigCodeConfig, _T.GPTBigCodeForCausalLM,
                      _gpt2(multi_query=False, tie_word_embeddings=False), None),
    # StarCoder2: LayerNorm with bias, biases everywhere (use_bias), GQA, sliding window 8, tied.
    "starcoder2": (_T.Starcoder2Config, _T.Starcoder2ForCausalLM,
                   _neox(num_key_value_heads=2, sliding_window=8), None),
    # no linear biases (LayerNorms keep theirs), MQA, untied, no window, rope base 1e5.
    "starcoder2_nobias": (_T.Starcoder2Config, _T.Starcoder2ForCausalLM,
                          _neox(num_key_value_heads=1, use_bias=False, tie_word_embeddings=False,
                                rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
                          None),
}
del _T

ALL_FAMILIES = {**FAMILIES, **NEW_FAMILIES}
# Variants the engine refuses at startup -> the phrase its error must contain.
UNSUPPORTED = {"phi3_longrope": "longrope"}


def perturb_constants(model, seed: int = 0, std: float = 0.1):
    """Adds N(0, std) noise to every parameter that HF initialises to a constant: all biases,
    all norm weights (ones, or zeros for Gemma's (1 + w) norms) and norm biases, and the zeroed
    padding_idx row of embeddings. Deterministic in ``seed``; leaves other weights alone."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, module in sorted(model.named_modules(), key=lambda item: item[0]):
            is_norm = "Norm" in type(module).__name__
            for pname, param in sorted(module.named_parameters(recurse=False), key=lambda item: item[0]):
                if pname == "bias" or (is_norm and pname == "weight"):
                    param.add_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * std)
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                row = module.weight[module.padding_idx]
                scale = getattr(model.config, "initializer_range", None) or 0.02
                row.copy_(torch.randn(row.shape, generator=gen, dtype=torch.float32).to(row.dtype) * scale)


def make_model(directory, family: str = "llama", seed: int = 0, **overrides):
    """Saves a tiny random model of ``family`` into ``directory``; returns the torch model."""
    if family in FAMILIES:
        config_cls, model_cls, family_overrides, architecture = FAMILIES[family]
        base = COMMON
    else:
        config_cls, model_cls, family_overrides, architecture = NEW_FAMILIES[family]
        base = {}
    torch.manual_seed(seed)
    config = config_cls(**{**base, **family_overrides, **overrides})
    model = model_cls(config).eval()
    # HF initialises biases to zero and norm weights to one (Gemma: zero): make them matter.
    perturb_constants(model, seed)
    model.save_pretrained(str(directory))
    if architecture:
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["architectures"] = [architecture]
        cfg["bias"] = True
        with open(path, "w") as f:
            json.dump(cfg, f)
    return model


def hf_greedy(model, prompt_ids, max_new_tokens: int) -> list[int]:
    """Greedy tokens with EOS ignored (min_new_tokens would instead mask EOS out)."""
    rope = getattr(model.config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":
        # transformers 5.17 Phi3ForCausalLM.prepare_inputs_for_generation drops the cache when the
        # sequence reaches original_max_position_embeddings + 1 but still feeds only the last
        # token, so generate() is wrong from there on. Recompute the whole sequence each step:
        # longrope's factors (short/long) depend on the current total length.
        seq = list(prompt_ids)
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
                seq.append(int(logits.argmax()))
        return seq[len(prompt_ids):]
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def hf_logits(model, prompt_ids):
    with torch.no_grad():
        return model(torch.tensor([prompt_ids])).logits[0].float().numpy()

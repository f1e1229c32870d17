"""Tiny random HF models saved to disk, built with transformers (torch is the oracle)."""

from __future__ import annotations

import json
import os

import functools

import torch
import transformers

import remote_layouts
import remote_oracles

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


# OPT (init_std is what it reads for initializer_range), BLOOM (n_layer, n_head; MLP 4 * hidden)
# and MPT (d_model, n_heads, n_layers, max_seq_len, attn_config) in their own names.
def _opt(**kw):
    return {**_TOKENS, "init_std": 0.1, "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 512, **kw}


def _bloom(**kw):
    return {**_TOKENS, "hidden_size": 64, "n_layer": 2, "n_head": 4, **kw}


def _mpt(attn=None, **kw):
    return {**_TOKENS, "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 512, "attn_config": attn or {},
            **kw}


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
    # GPT-J: rotary over the first 8 of 16 dims per head in interleaved pairs, parallel residual
    # sharing ln_1, no q/k/v/out biases, biased MLP and LM head, gelu_new, untied.
    "gptj": (_T.GPTJConfig, _T.GPTJForCausalLM, _gpt2(rotary_dim=8), None),
    # 8 heads of 8 with rotary over the whole head, n_inner None (-> 4*64), exact gelu.
    "gptj_fullrot": (_T.GPTJConfig, _T.GPTJForCausalLM,
                     _gpt2(n_head=8, rotary_dim=8, n_inner=None, activation_function="gelu"), None),
    # A tied head keeps lm_head.bias: refused (UNSUPPORTED).
    "gptj_tied": (_T.GPTJConfig, _T.GPTJForCausalLM, _gpt2(rotary_dim=8, tie_word_embeddings=True), None),
    # GLM (native): GQA 4/2, head_dim 16, q/k/v biases, rotary over the first half of each head
    # (GlmConfig's default partial_rotary_factor 0.5), interleaved pairs, fused gate_up_proj, untied.
    # GlmConfig's pad_token_id (151329) is out of the tiny vocabulary: 0.
    "glm": (_T.GlmConfig, _T.GlmForCausalLM, dict(_LLAMA_NAMES, pad_token_id=0, num_key_value_heads=2,
                                                  head_dim=16), None),
    # MQA, no q/k/v bias, tied, rotary 0.75 of the head, base 500.
    "glm_mqa_tied": (_T.GlmConfig, _T.GlmForCausalLM,
                     dict(_LLAMA_NAMES, pad_token_id=0, num_key_value_heads=1, head_dim=16, attention_bias=False,
                          tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                           "partial_rotary_factor": 0.75}),
                     None),
    # MHA with head_dim 32 != 64/4, rotary 0.25 of the head with linear scaling x2.
    "glm_hd32_linear": (_T.GlmConfig, _T.GlmForCausalLM,
                        dict(_LLAMA_NAMES, pad_token_id=0, num_key_value_heads=4, head_dim=32,
                             rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.25}),
                        None),
    # -------- Remote-code families: the native oracle's weights rewritten in the remote layout and
    # config (5th element, tests/remote_layouts.py). architecture None: the writer sets it.
    # Qwen v1 from Qwen2 (MHA, q/k/v bias; no_bias=true), use_dynamic_ntk and use_logn_attn on with
    # seq_length 256: the engine caps the context there, where both are inactive.
    "qwen": (_T.Qwen2Config, _T.Qwen2ForCausalLM, dict(_LLAMA_NAMES, num_key_value_heads=4), None,
             functools.partial(remote_layouts.write_qwen, seq_length=256, dynamic_ntk=True, logn=True)),
    # rotary_pct 0.5, base 5000, tied, from Phi-3 (no q/k/v bias: c_attn.bias written as zeros).
    "qwen_partial_tied": (_T.Phi3Config, _T.Phi3ForCausalLM,
                          _phi3(num_key_value_heads=4, tie_word_embeddings=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 5000.0,
                                                 "partial_rotary_factor": 0.5}),
                          None, remote_layouts.write_qwen),
    # no_bias=false (c_proj, w1, w2, mlp.c_proj biased), from Llama with attention_bias and mlp_bias.
    "qwen_bias": (_T.LlamaConfig, _T.LlamaForCausalLM,
                  dict(_LLAMA_NAMES, num_key_value_heads=4, attention_bias=True, mlp_bias=True), None,
                  remote_layouts.write_qwen),
    # InternLM2 from Llama: wqkv grouped [KVH, G + 2, D] with GQA 4/2, bias on wqkv and wo, untied.
    "internlm2": (_T.LlamaConfig, _T.LlamaForCausalLM,
                  dict(_LLAMA_NAMES, num_key_value_heads=2, attention_bias=True), None,
                  remote_layouts.write_internlm2),
    # MQA (G = 4), no bias, tied, rope_scaling {"type": "linear", "factor": 2}.
    "internlm2_mqa_linear": (_T.LlamaConfig, _T.LlamaForCausalLM,
                             dict(_LLAMA_NAMES, num_key_value_heads=1, tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
                             None, remote_layouts.write_internlm2),
    # MHA (G = 1), rope_scaling {"type": "dynamic", "factor": 2} (inactive within 512 positions), base 1e6.
    "internlm2_mha_dynamic": (_T.LlamaConfig, _T.LlamaForCausalLM,
                              dict(_LLAMA_NAMES, num_key_value_heads=4,
                                   rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                    "rope_theta": 1000000.0}),
                              None, remote_layouts.write_internlm2),
    # ChatGLM2/3 from GLM (whose rotary is ChatGLM's: see write_chatglm): multi_query_group_num 2 of 4
    # heads, kv_channels 16, add_qkv_bias, rope_ratio 1.
    "chatglm": (_T.GlmConfig, _T.GlmForCausalLM,
                dict(_LLAMA_NAMES, pad_token_id=0, num_key_value_heads=2, head_dim=16), None,
                remote_layouts.write_chatglm),
    # one KV group, kv_channels 32 != 64/4, no qkv bias, rope_ratio 5.
    "chatglm_mqa1": (_T.GlmConfig, _T.GlmForCausalLM,
                     dict(_LLAMA_NAMES, pad_token_id=0, num_key_value_heads=1, head_dim=32, attention_bias=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 50000.0,
                                           "partial_rotary_factor": 0.5}),
                     None, remote_layouts.write_chatglm),
    # multi_query_attention false: query_key_value rows [heads, 3, D].
    "chatglm_mha": (_T.GlmConfig, _T.GlmForCausalLM,
                    dict(_LLAMA_NAMES, pad_token_id=0, num_key_value_heads=4, head_dim=16), None,
                    remote_layouts.write_chatglm),
    # -------- OPT, BLOOM, MPT, Baichuan.
    # OPT-125m style: pre-LN, learned positions at row position + 2, ReLU, biases, tied.
    "opt": (_T.OPTConfig, _T.OPTForCausalLM, _opt(), None),
    # OPT-350m style: post-LN (norm after each residual add), no final norm, 32-wide embeddings
    # and tied head with project_in / project_out to the 64-wide layers.
    "opt_350m": (_T.OPTConfig, _T.OPTForCausalLM, _opt(do_layer_norm_before=False, word_embed_proj_dim=32), None),
    # enable_bias false, LayerNorms without weight or bias, _remove_final_layer_norm, untied.
    "opt_nobias_noaffine": (_T.OPTConfig, _T.OPTForCausalLM,
                            _opt(enable_bias=False, layer_norm_elementwise_affine=False,
                                 _remove_final_layer_norm=True, tie_word_embeddings=False), None),
    # BLOOM: ALiBi (4 heads), word_embeddings_layernorm, query_key_value rows [heads, 3, d], tanh GeLU.
    "bloom": (_T.BloomConfig, _T.BloomForCausalLM, _bloom(), None),
    # 6 heads of 8: non-power-of-two ALiBi slopes.
    "bloom_6h": (_T.BloomConfig, _T.BloomForCausalLM, _bloom(hidden_size=48, n_head=6), None),
    # apply_residual_connection_post_layernorm: the residuals are the normed block inputs.
    "bloom_residual_postln": (_T.BloomConfig, _T.BloomForCausalLM,
                              _bloom(apply_residual_connection_post_layernorm=True), None),
    # MPT: ALiBi (alibi_bias_max 8), LayerNorms without bias, Wqkv rows q|k|v, exact GeLU, tied.
    "mpt": (_T.MptConfig, _T.MptForCausalLM, _mpt(), None),
    # 6 heads of 8 (non-power-of-two slopes), clip_qkv 0.5 (clamps about half of q/k/v), softmax_scale.
    "mpt_6h_clip": (_T.MptConfig, _T.MptForCausalLM,
                    _mpt({"clip_qkv": 0.5, "softmax_scale": 0.2}, d_model=48, n_heads=6), None),
    # What transformers' port ignores, computed as MosaicML's code does (tests/remote_oracles.py):
    # alibi_bias_max 16, expansion_ratio 2, qk_ln after clip_qkv 1.0; 6 heads, untied.
    "mpt_remote_qkln": (_T.MptConfig, remote_oracles.MPTForCausalLM,
                        _mpt({"alibi_bias_max": 16, "qk_ln": True, "clip_qkv": 1.0}, d_model=48, n_heads=6,
                             expansion_ratio=2, tie_word_embeddings=False), None),
    # Baichuan-7B (BaiChuanForCausalLM, remote): Llama with q/k/v packed in W_pack.
    "baichuan_7b": (_T.LlamaConfig, _T.LlamaForCausalLM, dict(_LLAMA_NAMES, num_key_value_heads=4), None,
                    remote_oracles.write_baichuan),
    # Baichuan2 (vocab 125696): NormHead, lm_head rows normalized at load (rotary here: see
    # tests/test_baichuan.py for the ALiBi ones).
    "baichuan2_normhead": (_T.LlamaConfig, _T.LlamaForCausalLM,
                           dict(_LLAMA_NAMES, num_key_value_heads=4, vocab_size=125696), None,
                           functools.partial(remote_oracles.write_baichuan, normhead=True)),
    # DeciLM (remote, variable GQA): KV heads 4, 1, 2 over three layers (MHA, MQA, GQA).
    "decilm": (_T.LlamaConfig, remote_oracles.DeciLMForCausalLM,
               dict(_LLAMA_NAMES, num_hidden_layers=3, num_key_value_heads=4,
                    num_key_value_heads_per_layer=[4, 1, 2]), None, remote_oracles.write_decilm),
}

# Mixtures of experts (models/moe.py). Expert MLPs of 48, top-2, sliding window 8 < the test prompt.
_MOE_ROPE = {"rope_type": "default", "rope_theta": 5000.0}
MOE_FAMILIES = {
    # Mixtral: softmax over the experts, top-2, renormalized; per-expert w1/w3/w2 on disk.
    "mixtral_4x": (_T.MixtralConfig, _T.MixtralForCausalLM,
                   dict(_LLAMA_NAMES, intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, sliding_window=8), None),
    "mixtral_8x": (_T.MixtralConfig, _T.MixtralForCausalLM,
                   dict(_LLAMA_NAMES, intermediate_size=48, num_key_value_heads=2, num_local_experts=8,
                        num_experts_per_tok=2, sliding_window=8), None),
    # DBRX: experts fused over experts (w1/v1/w2 [E * ffn, d]), 1-norm of the top-k weights,
    # clip_qkv, GQA 4/2, LayerNorm without bias. rope_theta in attn_config (DBRX's own
    # code reads it) and in rope_parameters (transformers 5.17 reads that one) alike.
    "dbrx": (_T.DbrxConfig, _T.DbrxForCausalLM,
             dict(_TOKENS, d_model=64, n_heads=4, n_layers=2, max_seq_len=512, rope_parameters=_MOE_ROPE,
                  attn_config=dict(kv_n_heads=2, clip_qkv=0.5, rope_theta=5000.0),
                  ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2)), None),
    # top-3 of 8, weights divided by their 2-norm, MQA, clip_qkv 8 (the released models'; it
    # rarely bites. transformers 5.17 fails on clip_qkv None: clamp(None, None)).
    "dbrx_norm2": (_T.DbrxConfig, _T.DbrxForCausalLM,
                   dict(_TOKENS, d_model=64, n_heads=4, n_layers=2, max_seq_len=512, rope_parameters=_MOE_ROPE,
                        attn_config=dict(kv_n_heads=1, clip_qkv=8.0, rope_theta=5000.0),
                        ffn_config=dict(ffn_hidden_size=48, moe_num_experts=8, moe_top_k=3,
                                        moe_normalize_expert_weights=2.0)), None),
    # Qwen2-MoE: top-2 of 4 without renormalization, a shared expert (48) with a sigmoid gate,
    # q/k/v biases.
    "qwen2_moe": (_T.Qwen2MoeConfig, _T.Qwen2MoeForCausalLM,
                  dict(_LLAMA_NAMES, num_key_value_heads=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2), None),
}
NEW_FAMILIES.update(MOE_FAMILIES)
del _T

ALL_FAMILIES = {**FAMILIES, **NEW_FAMILIES}
# Variants the engine refuses at startup -> the phrase its error must contain.
UNSUPPORTED = {"phi3_longrope": "longrope", "gptj_tied": "tie_word_embeddings"}


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
        config_cls, model_cls, family_overrides, architecture = NEW_FAMILIES[family][:4]
        base = {}
    torch.manual_seed(seed)
    config = config_cls(**{**base, **family_overrides, **overrides})
    model = model_cls(config).eval()
    # HF initialises biases to zero and norm weights to one (Gemma: zero): make them matter.
    perturb_constants(model, seed)
    model.save_pretrained(str(directory))
    for write_remote_layout in NEW_FAMILIES.get(family, ())[4:]:
        # A remote-code family (optional 5th element): the checkpoint and config.json are rewritten
        # in its own layout (tests/remote_layouts.py); nothing remote is run.
        write_remote_layout(model, str(directory))
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

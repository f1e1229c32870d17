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


def make_model(directory, family: str = "llama", seed: int = 0, **overrides):
    """Saves a tiny random model of ``family`` into ``directory``; returns the torch model."""
    config_cls, model_cls, family_overrides, architecture = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **family_overrides, **overrides})
    model = model_cls(config).eval()
    if family_overrides.get("attention_bias"):
        with torch.no_grad():  # HF initialises biases to zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj, layer.self_attn.o_proj):
                    proj.bias.normal_(0, 0.1)
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
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def hf_logits(model, prompt_ids):
    with torch.no_grad():
        return model(torch.tensor([prompt_ids])).logits[0].float().numpy()

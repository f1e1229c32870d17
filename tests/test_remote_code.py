"""Remote-code checkpoints (config.json ``auto_map`` + Python files in the model directory):
the engine maps the families it knows (Qwen v1, InternLM2, ChatGLM2/3, Baichuan, DeciLM) from config.json and
the tensors, refuses the others with the list of what it supports, and never imports or runs
a Python file of the model directory."""

import json

import numpy as np
import pytest

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.models.families import spec_from_hf_config, supported_architectures
from lmidist_jax.models.spec import UnsupportedModelError
from tiny_models import hf_greedy, make_model

ENGINE = dict(dtype="fp32", max_model_len=64, num_kv_blocks=32, max_rolling_batch_size=2, warmup=False,
              progress=False)


def plant_remote_code(directory, names, marker):
    """Python files that would create ``marker`` if anything imported or ran them."""
    for name in names:
        (directory / name).write_text(f"open({str(marker)!r}, 'w').write({name!r})\n")


def test_unmapped_remote_code_architecture_is_refused_without_running_it(tmp_path):
    marker = tmp_path.parent / f"{tmp_path.name}-executed"
    plant_remote_code(tmp_path, ["configuration_deepseek.py", "modeling_deepseek.py",
                                 "tokenization_deepseek.py"], marker)
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek",
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
        "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_deepseek.DeepseekTokenizer", None]}}))
    with pytest.raises(UnsupportedModelError) as refused:
        LLM(str(tmp_path), **ENGINE)
    message = str(refused.value)
    assert "DeepseekForCausalLM" in message
    for architecture in ("QWenLMHeadModel", "InternLM2ForCausalLM", "ChatGLMModel", "LlamaForCausalLM"):
        assert architecture in message
    assert ", ".join(supported_architectures()) in message
    assert not marker.exists()


def test_mapped_remote_code_family_runs_without_its_python_files(tmp_path):
    """A Qwen v1 directory with its modeling/configuration files: loaded from config.json and
    the tensors alone (the same greedy tokens as the transformers-native oracle)."""
    model_dir = tmp_path / "qwen"
    hf = make_model(model_dir, "qwen")
    marker = tmp_path / "executed"
    plant_remote_code(model_dir, ["configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py",
                                  "tokenization_qwen.py"], marker)
    # Its tokenizer is remote code too (QWenTokenizer): never run. It is rebuilt from
    # qwen.tiktoken (tests/test_remote_tokenizers.py); without that file the model takes
    # token ids and says so for text.
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
         "tokenizer_class": "QWenTokenizer"}))
    llm = LLM(str(model_dir), **ENGINE)
    assert llm.engine.tokenizer is None
    prompt = list(map(int, np.random.default_rng(3).integers(0, 128, 9)))
    out = llm.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == hf_greedy(hf, prompt, 8)
    text = llm.generate(["hello"], SamplingParams(max_new_tokens=2), use_tqdm=False)[0]
    assert text.finish_reason == "error" and "no tokenizer" in text.error
    assert not marker.exists()


QWEN = {"architectures": ["QWenLMHeadModel"], "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16,
        "num_hidden_layers": 2, "vocab_size": 128, "intermediate_size": 256, "seq_length": 2048,
        "max_position_embeddings": 8192}


@pytest.mark.parametrize("ntk, logn, limit", [(True, True, 2048), (True, False, 2048), (False, True, 2048),
                                              (False, False, 8192)])
def test_qwen_context_is_capped_where_dynamic_ntk_or_logn_would_act(ntk, logn, limit):
    # Both only change the model beyond seq_length (NTK alpha 1 and logn factor 1 up to it).
    spec = spec_from_hf_config({**QWEN, "use_dynamic_ntk": ntk, "use_logn_attn": logn})
    assert spec.max_model_len == limit
    assert spec.intermediate_size == 128  # the remote config holds twice the MLP width


CHATGLM = {"architectures": ["ChatGLMModel"], "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16,
           "num_layers": 2, "padded_vocab_size": 128, "ffn_hidden_size": 128, "seq_length": 512,
           "multi_query_attention": True, "multi_query_group_num": 2, "add_qkv_bias": True, "rope_ratio": 50}


def test_chatglm_spec():
    spec = spec_from_hf_config(CHATGLM)
    assert (spec.num_kv_heads, spec.head_dim, spec.rotary_dim, spec.rope_interleaved) == (2, 16, 8, True)
    assert spec.rope_theta == 500000.0 and spec.max_model_len == 512 and spec.qkv_bias and not spec.o_bias


DECILM = {"architectures": ["DeciLMForCausalLM"], "model_type": "deci", "hidden_size": 64,
          "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 128,
          "intermediate_size": 128, "num_key_value_heads_per_layer": [4, 1]}


def test_decilm_spec_keeps_each_layers_kv_heads():
    from lmidist_jax.models.loader import spec_for_mesh

    spec = spec_from_hf_config(DECILM)
    assert spec.kv_heads_per_layer == (4, 1) and spec.num_kv_heads == 4 and spec.total_kv_heads == 5
    # TP=2 replicates only the one-head layer; TP=4 both up to 4.
    assert spec_for_mesh(spec, 2).kv_heads_per_layer == (4, 2)
    assert spec_for_mesh(spec, 4).kv_heads_per_layer == (4, 4)
    assert spec_from_hf_config({**DECILM, "num_key_value_heads_per_layer": None}).kv_heads_per_layer is None


@pytest.mark.parametrize("config, phrase", [
    ({**CHATGLM, "apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
    ({**CHATGLM, "pre_seq_len": 128}, "pre_seq_len"),
    ({**CHATGLM, "quantization_bit": 4}, "quantization_bit"),
    ({"architectures": ["ChatGLMModel"], "hidden_size": 64, "num_attention_heads": 4, "num_layers": 2,
      "vocab_size": 128, "inner_hidden_size": 256, "position_encoding_2d": True}, "v1"),
    ({**QWEN, "kv_channels": 32}, "kv_channels"),
    ({"architectures": ["InternLM2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
      "num_hidden_layers": 2, "vocab_size": 128, "intermediate_size": 128,
      "rope_scaling": {"type": "yarn", "factor": 2.0}}, "linear and dynamic"),
    ({**DECILM, "block_configs": [{}, {}]}, "block_configs"),
    ({**DECILM, "num_key_value_heads_per_layer": [4, 2, 1]}, "3 entries for 2 layers"),
    ({**DECILM, "num_key_value_heads_per_layer": [4, 3]}, "must divide"),
])
def test_remote_family_features_we_do_not_run_are_refused(config, phrase):
    with pytest.raises(UnsupportedModelError, match=phrase):
        spec_from_hf_config(config)

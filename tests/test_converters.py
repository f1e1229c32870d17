"""converters.checkpoint: model resolution, config/dtype parsing and checkpoint tensor loading."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from converters import ModelLoadError, iter_checkpoint_tensors, load_config, parse_dtype, resolve_model_dir
from lmidist_jax import model_store


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 8)).astype(ml_dtypes.bfloat16),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((12, 8)).astype(np.float16),
        "model.norm.weight": np.ones(8, np.float32),
    }


def _model_dir(path: Path, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return path


def _assert_same(loaded: dict[str, np.ndarray], expected: dict[str, np.ndarray]):
    assert set(loaded) == set(expected)
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        np.testing.assert_array_equal(loaded[name].astype(np.float32), array.astype(np.float32), err_msg=name)


def _write_sharded_safetensors(model_dir: Path, tensors: dict[str, np.ndarray]):
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(model_dir / shard))
    index = {"metadata": {}, "weight_map": {n: s for s, members in shards.items() for n in members}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


# ---------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------

def test_single_safetensors_with_bf16(tmp_path):
    d = _model_dir(tmp_path / "m")
    tensors = _tensors()
    save_file(tensors, str(d / "model.safetensors"))
    loaded = dict(iter_checkpoint_tensors(d, progress=False))
    _assert_same(loaded, tensors)
    assert loaded["model.layers.0.self_attn.q_proj.weight"].dtype == ml_dtypes.bfloat16
    assert isinstance(loaded["model.norm.weight"], np.ndarray)
    _assert_same(dict(iter_checkpoint_tensors(d, "safetensors", progress=True)), tensors)


def test_sharded_safetensors(tmp_path):
    d = _model_dir(tmp_path / "m")
    tensors = _tensors()
    _write_sharded_safetensors(d, tensors)
    _assert_same(dict(iter_checkpoint_tensors(d, progress=False)), tensors)


def test_sharded_safetensors_missing_shard(tmp_path):
    d = _model_dir(tmp_path / "m")
    _write_sharded_safetensors(d, _tensors())
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        iter_checkpoint_tensors(d, progress=False)


def test_auto_prefers_safetensors_over_bin(tmp_path):
    d = _model_dir(tmp_path / "m")
    tensors = _tensors()
    save_file(tensors, str(d / "model.safetensors"))
    (d / "pytorch_model.bin").write_bytes(b"not a real checkpoint")
    _assert_same(dict(iter_checkpoint_tensors(d, "auto", progress=False)), tensors)


# ---------------------------------------------------------------------------------------
# PyTorch .bin
# ---------------------------------------------------------------------------------------

def _torch_state(torch, tensors: dict[str, np.ndarray]) -> dict:
    state = {}
    for name, array in tensors.items():
        if array.dtype == ml_dtypes.bfloat16:
            state[name] = torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(array.copy())
    return state


def test_pt_single_and_sharded(tmp_path):
    import torch  # the test extra always installs the oracle
    tensors = _tensors()
    single = _model_dir(tmp_path / "single")
    torch.save(_torch_state(torch, tensors), single / "pytorch_model.bin")
    for fmt in ("auto", "pt"):
        loaded = dict(iter_checkpoint_tensors(single, fmt, progress=False))
        _assert_same(loaded, tensors)
        assert loaded["model.layers.0.self_attn.q_proj.weight"].dtype == ml_dtypes.bfloat16

    sharded = _model_dir(tmp_path / "sharded")
    names = sorted(tensors)
    weight_map = {}
    for k, members in enumerate((names[:1], names[1:])):
        shard = f"pytorch_model-0000{k + 1}-of-00002.bin"
        torch.save(_torch_state(torch, {n: tensors[n] for n in members}), sharded / shard)
        weight_map.update({n: shard for n in members})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same(dict(iter_checkpoint_tensors(sharded, "pt", progress=False)), tensors)
    # safetensors requested explicitly, but only .bin present
    with pytest.raises(ModelLoadError, match=r"load_format=safetensors.*\*\.safetensors"):
        iter_checkpoint_tensors(sharded, "safetensors", progress=False)


def test_pt_without_torch(tmp_path, monkeypatch):
    d = _model_dir(tmp_path / "m")
    (d / "pytorch_model.bin").write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    for fmt in ("pt", "auto"):
        with pytest.raises(ModelLoadError, match=r"load_format=pt .*needs torch.*pip install torch.*safetensors"):
            iter_checkpoint_tensors(d, fmt, progress=False)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------

def test_bad_load_format(tmp_path):
    d = _model_dir(tmp_path / "m")
    with pytest.raises(ModelLoadError, match=r"'gguf'.*auto, safetensors, pt"):
        iter_checkpoint_tensors(d, "gguf")


def test_no_weight_files(tmp_path):
    d = _model_dir(tmp_path / "m")
    with pytest.raises(ModelLoadError) as err:
        iter_checkpoint_tensors(d, progress=False)
    message = str(err.value)
    assert str(d) in message and "model.safetensors" in message and "pytorch_model.bin" in message
    with pytest.raises(ModelLoadError, match="pytorch_model"):
        iter_checkpoint_tensors(d, "pt", progress=False)


def test_missing_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json is missing") as err:
        resolve_model_dir(str(tmp_path / "m"))
    assert str(tmp_path / "m") in str(err.value)
    with pytest.raises(ModelLoadError, match=r"config\.json is missing"):
        load_config(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_config(tmp_path / "m")


def test_load_config_and_local_dir(tmp_path):
    d = _model_dir(tmp_path / "m", {"model_type": "llama", "hidden_size": 8})
    assert resolve_model_dir(str(d)) == d
    assert load_config(d) == {"model_type": "llama", "hidden_size": 8}


def test_hf_id_not_cached(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir("someorg/some-model")
    message = str(err.value)
    assert "someorg/some-model" in message and str(cache) in message
    assert "never downloads" in message and "local model directory" in message
    assert list(cache.iterdir()) == []  # nothing was fetched


def test_hf_id_from_local_cache(tmp_path, monkeypatch):
    # The hub cache layout: models--org--name/{refs/main, snapshots/<sha>/...}
    home = tmp_path / "hf_home"
    repo = home / "hub" / "models--someorg--tiny"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = _model_dir(repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("someorg/tiny") == snapshot
    assert resolve_model_dir("someorg/tiny", revision=sha) == snapshot
    with pytest.raises(ModelLoadError, match="revision v9"):
        resolve_model_dir("someorg/tiny", revision="v9")


def test_known_name_uses_model_store(tmp_path, monkeypatch):
    d = _model_dir(tmp_path / "converted")
    calls = []
    monkeypatch.setattr(model_store, "fetch_model", lambda name: calls.append(name) or d)
    monkeypatch.chdir(tmp_path)
    assert model_store.resolve_model("smollm2") == d and calls == ["smollm2"]
    # converters knows no model store: a name only resolves through the one it is given.
    with pytest.raises(ModelLoadError, match="neither an existing directory"):
        resolve_model_dir("smollm2")


def test_unrecognised_model_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="neither an existing directory"):
        resolve_model_dir("./no/such/dir")
    with pytest.raises(ModelLoadError, match="no model given"):
        resolve_model_dir("")


# ---------------------------------------------------------------------------------------
# dtype
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("fp32", "float32"), ("float32", "float32"), ("fp16", "float16"), ("float16", "float16"),
    ("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("BF16", "bfloat16"),
])
def test_parse_dtype_explicit(value, expected):
    assert parse_dtype(value, {"torch_dtype": "float16"}) == expected


def test_parse_dtype_auto():
    assert parse_dtype("auto", {}) == "float32"
    assert parse_dtype("auto", {"torch_dtype": "bfloat16"}) == "bfloat16"
    assert parse_dtype("auto", {"dtype": "float16"}) == "float16"
    assert parse_dtype(None, {"torch_dtype": "torch.bfloat16"}) == "bfloat16"
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        parse_dtype("auto", {"torch_dtype": "float8_e4m3fn"})


def test_parse_dtype_bad_value():
    with pytest.raises(ValueError, match=r"'int8'.*auto, fp32, fp16, bf16"):
        parse_dtype("int8", {})


def test_save_converted_never_clobbers_a_foreign_directory(tmp_path):
    from lmidist_jax import LLM, SamplingParams
    from tiny_models import make_model

    source = tmp_path / "hf"
    make_model(source, "llama")
    options = dict(dtype="fp32", max_model_len=64, num_kv_blocks=32, warmup=False, progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an earlier converted save"):
        LLM(str(source), save_converted=str(foreign), **options)
    assert (foreign / "notes.txt").read_text() == "keep me"

    # A converted directory can be re-saved onto itself: its side files survive.
    saved = tmp_path / "saved"
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    want = LLM(str(source), save_converted=str(saved), **options).generate([[1, 2, 3]], params, use_tqdm=False)
    assert (saved / "generation_config.json").exists()
    again = LLM(str(saved), save_converted=str(saved), **options).generate([[1, 2, 3]], params, use_tqdm=False)
    assert (saved / "generation_config.json").exists() and not (tmp_path / "saved.partial").exists()
    assert again[0].token_ids == want[0].token_ids

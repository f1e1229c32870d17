"""User mistakes at load time get errors that name the value and what is accepted."""

import json
import sys

import pytest

from lmidist_jax import LLM
from tiny_models import make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    make_model(directory, "llama")
    return directory


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path), warmup=False, progress=False)


def test_unsupported_architecture(tmp_path, model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        LLM(str(tmp_path), warmup=False, progress=False)
    assert "FancyNewForCausalLM" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_hf_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError) as err:
        LLM("some-org/some-model", warmup=False, progress=False)
    assert "some-org/some-model" in str(err.value) and "cache" in str(err.value)


def test_load_format_pt_without_torch(tmp_path, model_dir, monkeypatch):
    import torch

    state = {k: torch.zeros(1) for k in ["x"]}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ValueError, match="torch"):
        LLM(str(tmp_path), load_format="pt", warmup=False, progress=False)


@pytest.mark.parametrize("dtype", ["fp64", "int8", "half-precision"])
def test_bad_dtype(model_dir, dtype):
    with pytest.raises(ValueError) as err:
        LLM(str(model_dir), dtype=dtype, warmup=False, progress=False)
    assert dtype in str(err.value) and "bf16" in str(err.value)


def test_bad_load_format(model_dir):
    with pytest.raises(ValueError) as err:
        LLM(str(model_dir), load_format="onnx", warmup=False, progress=False)
    assert "onnx" in str(err.value) and "safetensors" in str(err.value)


def test_max_model_len_over_model_limit(model_dir):
    with pytest.raises(ValueError, match="max_model_len=100000"):
        LLM(str(model_dir), max_model_len=100000, num_kv_blocks=64, warmup=False, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stop_token_ids=[1.9]), "stop_token_ids"),
    (dict(stop_token_ids=["x"]), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(temperature=2e6), r"temperature=2000000\.0: expected a number in \[0, 1e6\]"),
])
def test_bad_sampling_params_name_the_value(kwargs, message):
    from lmidist_jax.sampling_params import RequestError, SamplingParams

    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_accept_numpy_ints():
    import numpy as np

    from lmidist_jax.sampling_params import SamplingParams

    p = SamplingParams(stop_token_ids=[np.int64(3)], max_new_tokens=np.int32(5))
    assert p.stop_token_ids == (3,) and type(p.stop_token_ids[0]) is int

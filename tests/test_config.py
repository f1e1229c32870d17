"""The engine configuration: sources, precedence, aliases, coercion and validation."""

import dataclasses
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmidist_jax.config import (
    ConfigError,
    EngineConfig,
    config_from_kwargs,
    find_properties,
    options_from_env,
    parse_properties,
    read_properties,
)
from lmidist_jax.config import options as options_module
from lmidist_jax.config import properties as properties_module

DEVICES = 4
SHIPPED_NOT_YET_SUPPORTED = frozenset(options_module.NOT_YET_SUPPORTED)
SHIPPED_TENSOR_PARALLEL_SUPPORTED = options_module.TENSOR_PARALLEL_SUPPORTED

# name -> (string as written in serving.properties / env, expected value, other options it needs)
CASES = {
    "engine": ("Python", "Python", {}),
    "rolling_batch": ("auto", "lmi-dist", {}),
    "model_id": ("org/model", "org/model", {}),
    "revision": ("abc123", "abc123", {}),
    "tensor_parallel_degree": ("2", 2, {}),
    "max_rolling_batch_size": ("8", 8, {}),
    "max_rolling_batch_prefill_tokens": ("512", 512, {}),
    "max_model_len": ("1024", 1024, {}),
    "load_format": ("safetensors", "safetensors", {}),
    "enforce_eager": ("TRUE", True, {}),
    "gpu_memory_utilization": ("0.5", 0.5, {}),
    "quantize": ("AWQ", "awq", {}),
    "speculative_draft_model": ("org/draft", "org/draft", {}),
    "draft_model_tp_size": ("2", 2, {"tensor_parallel_degree": "2"}),
    "speculative_length": ("3", 3, {}),
    "record_acceptance_rate": ("true", True, {}),
    "enable_lora": ("True", True, {}),
    "max_loras": ("2", 2, {"enable_lora": "true"}),
    "max_lora_rank": ("32", 32, {"enable_lora": "true"}),
    "lora_extra_vocab_size": ("0", 0, {"enable_lora": "true"}),
    "max_cpu_loras": ("8", 8, {"enable_lora": "true"}),
    "adapter_roots": ("/srv/adapters,/data", "/srv/adapters,/data", {}),
    "dtype": ("bfloat16", "bf16", {}),
    "trust_remote_code": ("true", True, {}),
    "enable_prefix_caching": ("true", True, {}),
    "max_logprobs": ("0", 0, {}),
    "output_formatter": ("sse", "sse", {}),
    "job_queue_size": ("10", 10, {}),
    "drain_seconds": ("2.5", 2.5, {}),
    "block_size": ("32", 32, {}),
    "num_kv_blocks": ("100", 100, {}),
    "kv_cache_memory_gb": ("1.5", 1.5, {}),
    "attention_backend": ("xla", "xla", {}),
    "compilation_cache_dir": ("/tmp/cache", "/tmp/cache", {}),
    "seed": ("7", 7, {}),
    "decode_steps": ("4", 4, {}),
    "save_converted": ("/tmp/saved", "/tmp/saved", {}),
}

ENV_NAMES = ("OPTION_", "HF_", "TENSOR_PARALLEL_DEGREE", "SM_NUM_GPUS", "MAX_BATCH", "ENABLE_CUDA_GRAPHS",
             "CUDA_MEMORY_FRACTION")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No ambient option variables; every "not yet supported" feature allowed unless a
    test says otherwise."""
    import os

    for var in list(os.environ):
        if var.startswith(ENV_NAMES):
            monkeypatch.delenv(var)
    monkeypatch.setattr(options_module, "NOT_YET_SUPPORTED", set())
    monkeypatch.setattr(options_module, "TENSOR_PARALLEL_SUPPORTED", True)


def build(options=None, environ=None, properties=None, tmp_path=None, num_devices=DEVICES, **kw):
    path = None
    if properties is not None:
        path = tmp_path / "serving.properties"
        path.write_text(properties)
    return EngineConfig.from_sources(options=options, properties_path=path, environ=environ or {},
                                     num_devices=num_devices, **kw)


def test_cases_cover_every_option():
    assert set(CASES) == set(EngineConfig.option_names())


def test_defaults():
    config = build(num_devices=1)
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    assert dataclasses.asdict(config) == defaults
    assert config.max_rolling_batch_size == 32 and config.engine == "MPI" and config.gpu_memory_utilization == 0.9
    assert build(num_devices=3).tensor_parallel_degree == 3  # default "max"


def test_default_tensor_parallel_degree_while_unsupported(monkeypatch):
    monkeypatch.setattr(options_module, "TENSOR_PARALLEL_SUPPORTED", False)
    assert build(num_devices=8).tensor_parallel_degree == 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_option_from_properties(tmp_path, name):
    raw, expected, extra = CASES[name]
    lines = [f"option.{k}={v}" for k, v in {**extra, name: raw}.items()]
    config = build(properties="\n".join(lines) + "\n", tmp_path=tmp_path)
    assert getattr(config, name) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_option_from_env(name):
    raw, expected, extra = CASES[name]
    environ = {f"OPTION_{k.upper()}": v for k, v in {**extra, name: raw}.items()}
    assert getattr(build(environ=environ), name) == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_option_from_kwargs(name):
    raw, expected, extra = CASES[name]
    assert getattr(build({**extra, name: raw}), name) == expected  # strings (CLI --option)
    assert getattr(build({**extra, name: expected}), name) == expected  # typed values


def test_top_level_properties_keys(tmp_path, caplog):
    text = "engine = Python\njob_queue_size=5\nminWorkers=1\noption.model_id=m\n"
    with caplog.at_level(logging.INFO, logger="lmidist_jax"):
        config = build(properties=text, tmp_path=tmp_path)
    assert (config.engine, config.job_queue_size, config.model_id) == ("Python", 5, "m")
    assert "minWorkers" in caplog.text


def test_precedence(tmp_path):
    env = {"OPTION_MAX_ROLLING_BATCH_SIZE": "1", "OPTION_SEED": "1", "OPTION_MAX_LOGPROBS": "1"}
    props = "option.max_rolling_batch_size=2\noption.seed=2\n"
    config = build({"max_rolling_batch_size": 3}, environ=env, properties=props, tmp_path=tmp_path)
    assert config.max_rolling_batch_size == 3  # kwargs > properties
    assert config.seed == 2  # properties > env
    assert config.max_logprobs == 1  # env > defaults
    assert config.max_model_len is None  # defaults
    # A None keyword option counts as not given.
    assert build({"seed": None}, environ=env, properties=props, tmp_path=tmp_path).seed == 2


# -- environment ---------------------------------------------------------------------------


ALIASES = [
    ("HF_MODEL_ID", "org/m", "model_id", "org/m"),
    ("HF_REVISION", "main", "revision", "main"),
    ("TENSOR_PARALLEL_DEGREE", "2", "tensor_parallel_degree", 2),
    ("HF_MODEL_QUANTIZE", "gptq", "quantize", "gptq"),
    ("HF_MODEL_TRUST_REMOTE_CODE", "true", "trust_remote_code", True),
    ("SM_NUM_GPUS", "4", "tensor_parallel_degree", 4),
    ("MAX_BATCH_PREFILL_TOKENS", "300", "max_rolling_batch_prefill_tokens", 300),
    ("MAX_BATCH_SIZE", "9", "max_rolling_batch_size", 9),
    ("ENABLE_CUDA_GRAPHS", "true", "enforce_eager", False),
    ("CUDA_MEMORY_FRACTION", "0.7", "gpu_memory_utilization", 0.7),
]


@pytest.mark.parametrize("var,value,name,expected", ALIASES, ids=[a[0] for a in ALIASES])
def test_env_alias(var, value, name, expected):
    assert getattr(build(environ={var: value}), name) == expected


def test_option_env_wins_over_aliases():
    env = {"MAX_BATCH_SIZE": "4", "OPTION_MAX_ROLLING_BATCH_SIZE": "8", "SM_NUM_GPUS": "4",
           "TENSOR_PARALLEL_DEGREE": "2", "HF_MODEL_ID": "a", "OPTION_MODEL_ID": "b"}
    config = build(environ=env)
    assert (config.max_rolling_batch_size, config.tensor_parallel_degree, config.model_id) == (8, 2, "b")
    assert options_from_env(env)["max_rolling_batch_size"] == "8"


@pytest.mark.parametrize("value,eager", [("true", False), ("True", False), ("false", True), ("FALSE", True)])
def test_enable_cuda_graphs_is_inverted(value, eager):
    assert options_from_env({"ENABLE_CUDA_GRAPHS": value}) == {"enforce_eager": str(eager).lower()}
    assert build(environ={"ENABLE_CUDA_GRAPHS": value}).enforce_eager is eager


def test_enable_cuda_graphs_invalid():
    with pytest.raises(ConfigError, match=r"ENABLE_CUDA_GRAPHS='maybe'.*true or false"):
        build(environ={"ENABLE_CUDA_GRAPHS": "maybe"})


def test_options_from_env_lowercases_and_ignores_others():
    env = {"OPTION_MAX_ROLLING_BATCH_SIZE": "8", "PATH": "/bin", "OPTION_": "x", "HF_HOME": "/h"}
    assert options_from_env(env) == {"max_rolling_batch_size": "8"}


def test_default_environ_is_os_environ(monkeypatch):
    monkeypatch.setenv("OPTION_SEED", "11")
    assert EngineConfig.from_sources(num_devices=1).seed == 11


# -- tensor parallel degree ----------------------------------------------------------------


@pytest.mark.parametrize("value,devices,expected",
                         [("max", 4, 4), ("MAX", 2, 2), ("max", 1, 1), ("1", 4, 1), (2, 4, 2), ("4", 4, 4)])
def test_tensor_parallel_degree(value, devices, expected):
    config = build({"tensor_parallel_degree": value}, num_devices=devices)
    assert config.tensor_parallel_degree == expected and isinstance(config.tensor_parallel_degree, int)


def test_tensor_parallel_degree_too_large():
    with pytest.raises(ConfigError, match="tensor_parallel_degree=3 but only 2 devices are visible"):
        build({"tensor_parallel_degree": 3}, num_devices=2)


def test_tensor_parallel_degree_counts_jax_devices():
    import jax

    assert build({"tensor_parallel_degree": "max"}, num_devices=None).tensor_parallel_degree == jax.device_count()


def test_tensor_parallel_not_yet_supported(monkeypatch):
    monkeypatch.setattr(options_module, "TENSOR_PARALLEL_SUPPORTED", False)
    with pytest.raises(ConfigError, match="tensor_parallel_degree=2 is not yet supported by lmidist-jax"):
        build({"tensor_parallel_degree": 2})
    with pytest.raises(ConfigError, match="tensor_parallel_degree=4 is not yet supported"):
        build({"tensor_parallel_degree": "max"})  # max -> 4
    assert build({"tensor_parallel_degree": 1}).tensor_parallel_degree == 1
    assert build({"tensor_parallel_degree": "max"}, num_devices=1).tensor_parallel_degree == 1


# -- validation ----------------------------------------------------------------------------

# (option, bad value, a fragment of what is accepted)
INVALID = [
    ("engine", "Rust", "MPI, Python"),
    ("rolling_batch", "vllm", "lmi-dist, auto"),
    ("tensor_parallel_degree", "0", "max or an integer >= 1"),
    ("tensor_parallel_degree", "two", "max or an integer >= 1"),
    ("max_rolling_batch_size", "0", "an integer >= 1"),
    ("max_rolling_batch_size", "1.5", "an integer >= 1"),
    ("max_rolling_batch_prefill_tokens", "0", "an integer >= 1"),
    ("max_model_len", "-1", "an integer >= 1"),
    ("load_format", "gguf", "auto, safetensors, pt"),
    ("enforce_eager", "yes", "true or false"),
    ("gpu_memory_utilization", "0", "a finite number > 0 and <= 1"),
    ("gpu_memory_utilization", "1.5", "a finite number > 0 and <= 1"),
    ("gpu_memory_utilization", "lots", "a finite number > 0 and <= 1"),
    ("quantize", "fp8", "awq, gptq, squeezellm"),
    ("draft_model_tp_size", "0", "an integer >= 1"),
    ("speculative_length", "0", "an integer >= 1"),
    ("record_acceptance_rate", "1", "true or false"),
    ("enable_lora", "on", "true or false"),
    ("max_loras", "0", "an integer >= 1"),
    ("max_lora_rank", "12", "8, 16, 32, 64"),
    ("lora_extra_vocab_size", "-1", "an integer >= 0"),
    ("max_cpu_loras", "0", "an integer >= 1"),
    ("dtype", "int8", "auto, fp32, fp16, bf16, float32, float16, half, bfloat16"),
    ("trust_remote_code", "maybe", "true or false"),
    ("enable_prefix_caching", "2", "true or false"),
    ("max_logprobs", "-1", "an integer >= 0"),
    ("output_formatter", "xml", "json, jsonlines, sse"),
    ("job_queue_size", "0", "an integer >= 1"),
    ("drain_seconds", "-1", "a number of seconds >= 0"),
    ("block_size", "24", "4, 8, 16, 32, 64, 128"),
    ("num_kv_blocks", "1", "an integer >= 2"),
    ("kv_cache_memory_gb", "0", "a finite number > 0"),
    ("kv_cache_memory_gb", "inf", "a finite number > 0"),
    ("attention_backend", "flash", "auto, xla, mosaic_gpu, triton"),
    ("seed", "x", "an integer"),
    ("decode_steps", "0", "an integer >= 1"),
]


@pytest.mark.parametrize("name,value,accepted", INVALID, ids=[f"{n}={v}" for n, v, _ in INVALID])
def test_invalid_value(name, value, accepted, tmp_path):
    for source in ({"options": {name: value}}, {"environ": {f"OPTION_{name.upper()}": value}},
                   {"properties": f"option.{name}={value}\n", "tmp_path": tmp_path}):
        with pytest.raises(ConfigError) as info:
            build(**source)
        message = str(info.value)
        assert f"option.{name}={value}" in message and accepted in message, message


def test_invalid_value_names_its_source():
    with pytest.raises(ConfigError, match="environment variable MAX_BATCH_SIZE"):
        build(environ={"MAX_BATCH_SIZE": "none"})


def test_invalid_typed_values():
    for name, value in [("max_rolling_batch_size", True), ("enforce_eager", 1), ("dtype", 16), ("model_id", 3)]:
        with pytest.raises(ConfigError, match=f"option.{name}={value}"):
            build({name: value})


@pytest.mark.parametrize("value", ["bitsandbytes", "bitsandbytes8", "BitsAndBytes"])
def test_bitsandbytes_is_deprecated(value):
    with pytest.raises(ConfigError) as info:
        build({"quantize": value})
    message = str(info.value)
    assert f"option.quantize={value}" in message and "deprecated in lmi-dist" in message
    assert "awq" in message and "gptq" in message and "squeezellm" in message


def test_draft_model_tp_size_must_be_1_or_tp():
    assert build({"tensor_parallel_degree": 4, "draft_model_tp_size": 4}).draft_model_tp_size == 4
    with pytest.raises(ConfigError, match=r"draft_model_tp_size=2 .*accepted 1 or tensor_parallel_degree \(4\)"):
        build({"tensor_parallel_degree": 4, "draft_model_tp_size": 2})


@pytest.mark.parametrize("name,value", [("max_loras", "2"), ("max_lora_rank", "8"), ("max_cpu_loras", "8"),
                                        ("lora_extra_vocab_size", "256")])
def test_lora_options_need_enable_lora(name, value):
    for extra in ({}, {"enable_lora": "false"}):
        with pytest.raises(ConfigError) as info:
            build({**extra, name: value})
        message = str(info.value)
        assert f"option.{name}={value}" in message and "enable_lora=true" in message, message
    assert getattr(build({"enable_lora": True, name: value}), name) == int(value)


def test_lora_with_speculative_decoding_is_accepted():
    # lmi-dist refused the pair; here the target applies each request's adapter and the
    # draft runs the base model (tests/test_spec_decode.py).
    config = build({"enable_lora": "true", "speculative_draft_model": "draft"})
    assert config.enable_lora and config.speculative_draft_model == "draft"


def test_max_cpu_loras_at_least_max_loras():
    with pytest.raises(ConfigError, match=r"max_cpu_loras=2 .*>= max_loras \(4\)"):
        build({"enable_lora": True, "max_cpu_loras": 2})
    assert build({"enable_lora": True, "max_cpu_loras": 4}).max_cpu_loras == 4


def test_optional_values_accept_none_text():
    config = build({"max_model_len": "none", "num_kv_blocks": "", "output_formatter": "None"})
    assert (config.max_model_len, config.num_kv_blocks, config.output_formatter) == (None, None, None)


def test_missing_properties_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        EngineConfig.from_sources(properties_path=tmp_path / "nope.properties", environ={}, num_devices=1)


# -- not yet supported ---------------------------------------------------------------------


NOT_YET = [
    # option, value, shown in the message, its default as text, a bad setting (own message)
    ("quantize", "awq", "awq", "none", {"quantize": "fp8"}),
]


@pytest.mark.parametrize("name,value,shown,default,bad", NOT_YET, ids=[n[0] for n in NOT_YET])
def test_not_yet_supported(monkeypatch, name, value, shown, default, bad):
    # The mechanism, on an option that once went through it (every feature has landed).
    monkeypatch.setattr(options_module, "NOT_YET_SUPPORTED", {name})
    with pytest.raises(ConfigError, match=f"option.{name}={shown} is not yet supported by lmidist-jax"):
        build({name: value})
    build({name: default})
    with pytest.raises(ConfigError) as info:
        build(bad)  # validated before the refusal
    assert "not yet supported" not in str(info.value)
    # Shrinking the set lifts the refusal.
    monkeypatch.setattr(options_module, "NOT_YET_SUPPORTED", set())
    build({name: value})


def test_shipped_not_yet_supported_set():
    assert SHIPPED_NOT_YET_SUPPORTED == set()  # quantized checkpoints and LoRA adapters have landed
    assert SHIPPED_TENSOR_PARALLEL_SUPPORTED is True  # tensor parallelism has landed


# -- unknown options, describe -------------------------------------------------------------


def test_unknown_options_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lmidist_jax"):
        config = build({"max_num_warmup_buckets": 3}, environ={"OPTION_ENTRYPOINT": "x"},
                       properties="option.bogus_option=1\n", tmp_path=tmp_path)
    assert config == build()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for name in ("max_num_warmup_buckets", "entrypoint", "bogus_option"):
        assert name in warnings[0]


def test_describe_lists_every_option():
    config = build({"max_rolling_batch_size": 8})
    lines = config.describe().splitlines()
    assert [line.split()[0] for line in lines] == list(EngineConfig.option_names())
    assert any(line.startswith("max_rolling_batch_size") and "= 8" in line for line in lines)
    assert len(EngineConfig.option_names()) == len(dataclasses.fields(EngineConfig))


# -- serving.properties and config_from_kwargs ---------------------------------------------


def test_read_properties(tmp_path):
    path = tmp_path / "serving.properties"
    path.write_text("# comment\n! also a comment\n\n  engine = MPI  \noption.model_id: /opt/ml/model\n"
                    "option.a=x=y\noption.long=one,\\\n   two\noption.empty=\noption.a=z\n")
    assert read_properties(path) == {"engine": "MPI", "option.model_id": "/opt/ml/model",
                                     "option.a": "z", "option.long": "one,two", "option.empty": ""}


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,20}", fullmatch=True),
                       st.from_regex(r"[A-Za-z0-9_./:=-]{0,30}", fullmatch=True).map(str.strip), max_size=8))
def test_properties_round_trip(entries):
    text = "\n".join(f"{k}={v}" for k, v in entries.items())
    assert parse_properties(text) == entries


def test_find_properties(tmp_path):
    assert find_properties(tmp_path) is None
    assert find_properties(None) is None
    (tmp_path / "serving.properties").write_text("engine=MPI\n")
    assert find_properties(tmp_path) == tmp_path / "serving.properties"
    assert find_properties(tmp_path / "missing") is None


def test_model_dir_properties_and_default_model_id(tmp_path):
    (tmp_path / "serving.properties").write_text("option.max_rolling_batch_size=6\njob_queue_size=1\n")
    config = EngineConfig.from_sources(model_dir=tmp_path, environ={}, num_devices=1)
    assert (config.model_id, config.max_rolling_batch_size, config.job_queue_size) == (str(tmp_path), 6, 1)
    (tmp_path / "serving.properties").write_text("option.model_id=org/other\n")
    assert EngineConfig.from_sources(model_dir=tmp_path, environ={}, num_devices=1).model_id == "org/other"


def test_config_from_kwargs(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTION_SEED", "5")
    monkeypatch.setenv("OPTION_MAX_LOGPROBS", "3")
    (tmp_path / "serving.properties").write_text("option.seed=6\noption.max_model_len=64\n")
    config = config_from_kwargs(tmp_path, max_model_len=128, tensor_parallel_degree=1)
    assert (config.model_id, config.seed, config.max_model_len, config.max_logprobs) == (str(tmp_path), 6, 128, 3)
    config = config_from_kwargs("smollm2", tensor_parallel_degree=1)  # not a directory: no properties
    assert (config.model_id, config.seed) == ("smollm2", 5)
    assert config_from_kwargs(tensor_parallel_degree=1).model_id is None


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        build().seed = 3


def test_properties_module_tables():
    assert set(properties_module.ENV_ALIASES.values()) <= set(EngineConfig.option_names())
    assert set(properties_module.ENV_DIRECT.values()) <= set(EngineConfig.option_names())


def test_of_takes_a_config_or_a_stand_in():
    """Readers take typed attributes: a stand-in (an argparse namespace, a partial one in a
    test) becomes an EngineConfig whose other options keep the one declared default."""
    import argparse

    config = build({"seed": 7})
    assert EngineConfig.of(config) is config
    stand_in = EngineConfig.of(argparse.Namespace(tensor_parallel_degree=2, max_loras=8, verbose=True))
    assert (stand_in.tensor_parallel_degree, stand_in.max_loras) == (2, 8)
    assert stand_in.enable_lora is False and stand_in.job_queue_size == EngineConfig().job_queue_size
    assert not hasattr(stand_in, "verbose")

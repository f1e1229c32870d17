"""Start-up: the persistent compilation cache option (default beside the models,
override, none) and lazy (one-shot) vs full (serve) warm-up."""

from __future__ import annotations

import jax
import pytest

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.config import EngineConfig
from lmidist_jax.engine.factory import build_engine, configure_compilation_cache
from tiny_models import make_model

ENGINE = dict(dtype="fp32", max_model_len=64, block_size=4, num_kv_blocks=64, max_rolling_batch_size=4,
              max_rolling_batch_prefill_tokens=64, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_model(directory, "llama", num_key_value_heads=2)
    return str(directory)


def _config(**options):
    return EngineConfig.from_sources(options=options, environ={}, num_devices=1)


def test_cache_dir_option_values():
    assert _config().compilation_cache_dir == "auto"
    assert _config(compilation_cache_dir="/x/y").compilation_cache_dir == "/x/y"
    assert _config(compilation_cache_dir="none").compilation_cache_dir is None
    assert _config(compilation_cache_dir="AUTO").compilation_cache_dir == "auto"
    environ = {"OPTION_COMPILATION_CACHE_DIR": "none"}
    assert EngineConfig.from_sources(environ=environ, num_devices=1).compilation_cache_dir is None


def test_cache_dir_default_is_beside_the_models(monkeypatch, tmp_path, restore_jax_cache_dir):
    monkeypatch.setenv("LMIDIST_JAX_CACHE", str(tmp_path / "user-cache"))
    configure_compilation_cache(None)
    assert jax.config.jax_compilation_cache_dir is None
    assert configure_compilation_cache("auto") == str(tmp_path / "user-cache" / "jax_compilation_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "user-cache" / "jax_compilation_cache")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    # A directory JAX was already given (JAX_COMPILATION_CACHE_DIR, the test suite's) wins over auto.
    configure_compilation_cache(str(tmp_path / "mine"))
    assert configure_compilation_cache("auto") == str(tmp_path / "mine")
    assert configure_compilation_cache(None) is None
    assert jax.config.jax_compilation_cache_dir is None


def test_engine_writes_and_reuses_the_cache(model_dir, tmp_path, restore_jax_cache_dir):
    cache = tmp_path / "jax-cache"
    llm = LLM(model_dir, compilation_cache_dir=str(cache), **ENGINE)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    entries = set(p.name for p in cache.iterdir())
    assert entries, "nothing was written to the compilation cache"
    # A second engine with the same buckets loads them: no new entries, same tokens.
    hits = []

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        again = LLM(model_dir, compilation_cache_dir=str(cache), **ENGINE)
        tokens = again.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, ignore_eos=True),
                                use_tqdm=False)[0].token_ids
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert tokens == out.token_ids
    assert set(p.name for p in cache.iterdir()) == entries
    assert hits, "the second engine did not read the cache"


def test_cache_off(model_dir, tmp_path, restore_jax_cache_dir):
    LLM(model_dir, compilation_cache_dir="none", **ENGINE)
    assert jax.config.jax_compilation_cache_dir is None


def test_one_shot_compiles_only_what_it_uses(model_dir):
    llm = LLM(model_dir, **ENGINE)  # the notebook / `generate` default: lazy
    runner = llm.engine.runner
    assert not runner._compiled
    llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, ignore_eos=True), use_tqdm=False)
    # One prefill bucket and one decode bucket, of the 6 a full warm-up compiles.
    assert runner.lazily_compiled == {(16, 4, False), (1, 1, True)}
    assert len(runner.warmup_shapes()) == 6


def test_serve_warmup_compiles_every_bucket(model_dir):
    config = EngineConfig.from_sources(options={k: v for k, v in ENGINE.items() if k != "progress"}
                                       | {"model_id": model_dir}, environ={}, num_devices=1)
    engine = build_engine(config, warmup=True, progress=False)  # what `serve` calls before /ping is healthy
    runner = engine.runner
    assert set(runner._compiled) == set(runner.warmup_shapes())
    assert runner.num_compiled_steps == len(runner.warmup_shapes())

"""Compiled steps cached on disk (engine/executable_cache.py): a later process traces
nothing; a changed program or source misses; a damaged entry falls back cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.engine import executable_cache
from tiny_models import make_model

ENGINE = dict(dtype="fp32", max_model_len=32, block_size=4, num_kv_blocks=32, max_rolling_batch_size=2,
              max_rolling_batch_prefill_tokens=16, progress=False)
PARAMS = SamplingParams(max_new_tokens=3, ignore_eos=True)
TESTS = os.path.dirname(os.path.abspath(__file__))
# One engine in a fresh process: its tokens and how it got its compiled steps.
CHILD = """
import json, sys
from lmidist_jax import LLM, SamplingParams
llm = LLM(sys.argv[1], compilation_cache_dir=sys.argv[2], **json.loads(sys.argv[3]))
out = llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, ignore_eos=True), use_tqdm=False)[0]
runner = llm.engine.runner
print(json.dumps({"tokens": out.token_ids, "traces": runner.num_step_traces,
                  "hits": runner.executable_cache.hits, "misses": runner.executable_cache.misses}))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    make_model(directory, "llama", num_key_value_heads=2, num_hidden_layers=1)
    return str(directory)


@pytest.fixture(scope="module")
def reference_tokens(model_dir):
    """Tokens of an engine without any cache."""
    llm = LLM(model_dir, compilation_cache_dir="none", **ENGINE)
    return llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False)[0].token_ids


def _generate(model_dir, cache, **options):
    llm = LLM(model_dir, compilation_cache_dir=str(cache), **(ENGINE | options))
    tokens = llm.generate([[1, 2, 3]], PARAMS, use_tqdm=False)[0].token_ids
    return tokens, llm.engine.runner


def test_second_process_traces_nothing(model_dir, reference_tokens, tmp_path):
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", CHILD, model_dir, str(tmp_path), json.dumps(ENGINE)],
                              capture_output=True, text=True, cwd=TESTS, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["traces"] == 2 and first["hits"] == 0  # one prefill and one decode bucket
    assert second == {"tokens": reference_tokens, "traces": 0, "hits": 2, "misses": 0}
    assert len(list((tmp_path / executable_cache.SUBDIR).glob("*.exe"))) == 2


def test_changed_option_or_source_misses(model_dir, reference_tokens, tmp_path, monkeypatch,
                                         restore_jax_cache_dir):
    tokens, runner = _generate(model_dir, tmp_path)
    assert (tokens, runner.num_step_traces) == (reference_tokens, 2)
    tokens, runner = _generate(model_dir, tmp_path)
    assert (tokens, runner.num_step_traces, runner.executable_cache.hits) == (reference_tokens, 0, 2)
    # An option that shapes the step: another program, traced again.
    tokens, runner = _generate(model_dir, tmp_path, max_logprobs=5)
    assert (tokens, runner.num_step_traces, runner.executable_cache.hits) == (reference_tokens, 2, 0)
    # Edited sources: every entry is stale.
    monkeypatch.setattr(executable_cache, "source_hash", lambda: "edited")
    tokens, runner = _generate(model_dir, tmp_path)
    assert (tokens, runner.num_step_traces, runner.executable_cache.hits) == (reference_tokens, 2, 0)


def test_damaged_entries_fall_back(model_dir, reference_tokens, tmp_path, restore_jax_cache_dir):
    _generate(model_dir, tmp_path)
    entries = sorted((tmp_path / executable_cache.SUBDIR).glob("*.exe"))
    assert len(entries) == 2
    entries[0].write_bytes(b"not a pickle")
    entries[1].write_bytes(entries[1].read_bytes()[:1000])  # truncated
    tokens, runner = _generate(model_dir, tmp_path)
    assert (tokens, runner.num_step_traces, runner.executable_cache.misses) == (reference_tokens, 2, 2)
    # Rewritten whole: the next engine loads them.
    tokens, runner = _generate(model_dir, tmp_path)
    assert (tokens, runner.num_step_traces, runner.executable_cache.hits) == (reference_tokens, 0, 2)
    # An entry under another entry's name (its stored key differs): a miss, never the wrong program.
    a, b = sorted((tmp_path / executable_cache.SUBDIR).glob("*.exe"))
    a.write_bytes(b.read_bytes())
    tokens, runner = _generate(model_dir, tmp_path)
    assert (tokens, runner.num_step_traces, runner.executable_cache.misses) == (reference_tokens, 1, 1)


def test_steps_jax_cached_are_stored_fresh(model_dir, reference_tokens, tmp_path, monkeypatch,
                                           restore_jax_cache_dir):
    """An executable JAX loaded from its persistent cache does not serialize to a copy that
    runs (XLA:CPU): what the executable cache stores is compiled afresh."""
    with monkeypatch.context() as m:  # steps only in JAX's persistent cache
        m.setattr(executable_cache.ExecutableCache, "from_jax_config", classmethod(lambda cls, program: None))
        assert _generate(model_dir, tmp_path)[0] == reference_tokens
    assert not (tmp_path / executable_cache.SUBDIR).exists()
    tokens, runner = _generate(model_dir, tmp_path)  # misses, compiles, stores
    assert (tokens, runner.executable_cache.misses) == (reference_tokens, 2)
    tokens, runner = _generate(model_dir, tmp_path)  # loads and runs what was stored
    assert (tokens, runner.num_step_traces, runner.executable_cache.hits) == (reference_tokens, 0, 2)


def test_mesh_smaller_than_the_process_loads_onto_its_own_devices(model_dir, tmp_path):
    """TP=2 in a process of 4 devices: the stored step is loaded onto the mesh's two devices
    (loading onto all four aborted the process in an XLA check)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    options = json.dumps(ENGINE | {"tensor_parallel_degree": 2})
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", CHILD, model_dir, str(tmp_path), options],
                              capture_output=True, text=True, cwd=TESTS, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["misses"] >= 1 and runs[0]["traces"] >= 1
    assert runs[1]["traces"] == 0 and runs[1]["hits"] >= 1 and runs[1]["misses"] == 0, runs[1]
    assert runs[1]["tokens"] == runs[0]["tokens"]

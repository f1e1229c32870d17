"""The fused glue kernels (pallas_kernels/fused_ops.py) in Pallas interpret mode: against
their XLA references, and inside the whole engine against the unfused XLA path."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from lmidist_jax import LLM, SamplingParams
from lmidist_jax.models import layers
from pallas_kernels import fused_ops
from tiny_models import make_model


def _max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


@pytest.mark.parametrize("num_tokens,size,dtype,plus_one", [
    (3, 96, jnp.float32, False),    # hidden not a power of two
    (5, 64, jnp.bfloat16, True),    # Gemma's (1 + w)
])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm(num_tokens, size, dtype, plus_one, with_delta):
    rng = np.random.default_rng(size)
    x, delta = (jnp.asarray(rng.normal(size=(num_tokens, size)) * 3, dtype) for _ in range(2))
    scale = jnp.asarray(rng.normal(size=size), dtype)
    delta = delta if with_delta else None
    want = fused_ops.add_rms_norm_reference(x, delta, scale, eps=1e-5, scale_plus_one=plus_one)
    got = fused_ops.add_rms_norm(x, delta, scale, eps=1e-5, scale_plus_one=plus_one, interpret=True)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    assert _max_err(got[0], want[0]) == 0.0  # the residual sum, rounded like XLA's add
    assert _max_err(got[1], want[1]) <= tol * float(jnp.max(jnp.abs(want[1].astype(jnp.float32))))
    # The norm module's own (XLA) path is the same arithmetic.
    norm = layers.Norm(size, norm_type="rms", eps=1e-5, scale_plus_one=plus_one, dtype=dtype)
    norm.scale[...] = scale
    xla = norm.add_and_norm(x, delta, None)
    assert _max_err(xla[1], want[1]) == 0.0


@pytest.mark.parametrize("kv_heads,group,head_dim,dtype", [
    (2, 3, 12, jnp.float32),   # GQA, half of head_dim (6) not a power of two
    (3, 1, 16, jnp.bfloat16),  # MHA
])
def test_rope_write_kv(kv_heads, group, head_dim, dtype):
    rng = np.random.default_rng(group)
    num_tokens, num_blocks, block = 6, 5, 4
    qkv = jnp.asarray(rng.normal(size=(num_tokens, kv_heads, group + 2, head_dim)), dtype)
    angles = rng.uniform(0, 6.3, size=(num_tokens, head_dim // 2))
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    k_pages, v_pages = (jnp.asarray(rng.normal(size=(kv_heads, num_blocks, block, head_dim)), dtype)
                        for _ in range(2))
    # Two padding tokens write into trash block 0 (slots 0 and 1); the rest anywhere else.
    slots = jnp.asarray([5, 17, 0, 1, 11, 8], jnp.int32)
    want = fused_ops.rope_write_kv_reference(qkv, cos, sin, k_pages, v_pages, slots)
    got = fused_ops.rope_write_kv(qkv, cos, sin, jnp.array(k_pages), jnp.array(v_pages), slots, interpret=True)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert _max_err(g, w) <= tol * 4
    # Untouched slots keep their contents; written ones changed.
    flat = np.asarray(got[1], np.float32).reshape(kv_heads, -1, head_dim)
    before = np.asarray(k_pages, np.float32).reshape(kv_heads, -1, head_dim)
    untouched = np.setdiff1d(np.arange(num_blocks * block), np.asarray(slots))
    assert np.array_equal(flat[:, untouched], before[:, untouched])
    assert not np.allclose(flat[:, 17], before[:, 17])


def test_mode_rejects_unknown_value(monkeypatch):
    monkeypatch.setenv("LMIDIST_FUSED_OPS", "fast")
    with pytest.raises(ValueError, match="LMIDIST_FUSED_OPS='fast'.*auto, off, interpret"):
        layers.fused_ops_mode(None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_fused")
    make_model(directory, "llama", num_key_value_heads=2)  # 2 query heads per KV head
    return str(directory)


def _generate(model_dir, prompts, cache_dir):
    llm = LLM(model_dir, dtype="fp32", max_model_len=64, block_size=4, num_kv_blocks=64,
              max_rolling_batch_size=4, max_rolling_batch_prefill_tokens=32, progress=False,
              compilation_cache_dir=str(cache_dir))
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.token_ids, [e.logprob for e in o.outputs[0].logprobs]) for o in outs]


def test_engine_with_fused_kernels_matches_xla(model_dir, monkeypatch, tmp_path, restore_jax_cache_dir):
    """Prefill chunks and decode steps of three prompts: greedy tokens and logprobs with the
    fused kernels (interpret mode) equal the plain XLA path's; the kernels were traced.
    A compilation cache of its own: with the suite's, a step stored by an earlier run of
    this test (same sources) is loaded and nothing is traced."""
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, 128, n))) for n in (5, 19, 40)]
    monkeypatch.setenv("LMIDIST_FUSED_OPS", "off")
    want = _generate(model_dir, prompts, tmp_path)
    calls = {"add_rms_norm": 0, "rope_write_kv": 0}
    for name in calls:
        original = getattr(fused_ops, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(fused_ops, name, counted)
    monkeypatch.setenv("LMIDIST_FUSED_OPS", "interpret")
    got = _generate(model_dir, prompts, tmp_path)
    assert calls["add_rms_norm"] > 0 and calls["rope_write_kv"] > 0, calls
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, g), (_, w) in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-3)

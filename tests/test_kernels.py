"""Pallas paged-attention kernels (interpret mode on CPU) against the XLA reference and a
float64 numpy reference. Fresh random inputs for every case; shapes kept tiny because
interpret mode is slow."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import (
    paged_attention,
    paged_attention_reference,
    paged_decode_attention,
    paged_decode_attention_reference,
    select_backend,
    write_kv_pages,
)
from pallas_kernels.reference import shuffled_block_tables

BLOCK = 16
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}


def _rel(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.all(np.isfinite(out)), "non-finite output"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _cache(rng, num_kv_heads, head_dim, num_blocks, dtype):
    shape = (num_kv_heads, num_blocks, BLOCK, head_dim)
    k = jnp.asarray(rng.standard_normal(shape), dtype)
    v = jnp.asarray(rng.standard_normal(shape), dtype)
    return k, v


def _tables(rng, lens, max_blocks, num_blocks):
    """Shuffled, non-contiguous block tables (block 0 = trash is never handed out)."""
    return jnp.asarray(shuffled_block_tables(rng, lens, block_size=BLOCK, max_blocks=max_blocks,
                                             free_blocks=np.arange(1, num_blocks)))


def _numpy_attention(q, k_pages, v_pages, block_tables, seq_ids, positions, scale,
                     sliding_window=None, soft_cap=None, alibi_slopes=None):
    """float64 per-token reference."""
    q = np.asarray(jnp.asarray(q, jnp.float32), np.float64)
    kp = np.asarray(jnp.asarray(k_pages, jnp.float32), np.float64)
    vp = np.asarray(jnp.asarray(v_pages, jnp.float32), np.float64)
    bt = np.asarray(block_tables)
    num_tokens, num_heads, head_dim = q.shape
    num_kv = kp.shape[0]
    group = num_heads // num_kv
    out = np.zeros_like(q)
    for t in range(num_tokens):
        p = int(positions[t])
        if p < 0:
            continue
        j = np.arange(p + 1)
        if sliding_window is not None:
            j = j[j > p - sliding_window]
        blocks = bt[int(seq_ids[t]), j // BLOCK]
        k = kp[:, blocks, j % BLOCK]  # [K, n, D]
        v = vp[:, blocks, j % BLOCK]
        for h in range(num_heads):
            s = k[h // group] @ q[t, h] * scale
            if soft_cap is not None:
                s = soft_cap * np.tanh(s / soft_cap)
            if alibi_slopes is not None:
                s = s + float(alibi_slopes[h]) * (j - p)
            w = np.exp(s - s.max())
            out[t, h] = (w / w.sum()) @ v[h // group]
    return out


DECODE_CASES = [
    # (id, num_kv_heads, group, head_dim, dtype, extra kwargs)
    ("gqa4-d64-f32-split4", 2, 4, 64, jnp.float32, dict(num_splits=4, pages_per_compute_block=2)),
    ("gqa4-d64-f32-nosplit", 2, 4, 64, jnp.float32, dict(num_splits=1)),
    ("mha-d128-bf16", 2, 1, 128, jnp.bfloat16, dict(num_splits=2, pages_per_compute_block=2)),
    ("gqa8-d80-bf16", 1, 8, 80, jnp.bfloat16, dict(num_splits=2, pages_per_compute_block=4)),
    ("mqa16-d256-f32", 1, 16, 256, jnp.float32, dict(num_splits=3)),
    ("gqa4-window-cap-alibi-bf16", 2, 4, 64, jnp.bfloat16,
     dict(num_splits=2, pages_per_compute_block=2, sliding_window=21, soft_cap=4.0,
          alibi=True)),
    ("mha-window-f32", 2, 1, 64, jnp.float32,
     dict(num_splits=1, pages_per_compute_block=2, sliding_window=16)),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_kernel(case):
    _, num_kv, group, head_dim, dtype, kw = case
    kw = dict(kw)
    rng = np.random.default_rng()
    lens = [1, BLOCK - 1, BLOCK, BLOCK + 1, 0, 7 * BLOCK + 5]  # ragged; 0 = padding row
    num_heads = num_kv * group
    max_blocks = 9
    k, v = _cache(rng, num_kv, head_dim, 32, dtype)
    bt = _tables(rng, lens, max_blocks, 32)
    q = jnp.asarray(rng.standard_normal((len(lens), num_heads, head_dim)), dtype)
    seq_lens = jnp.asarray(lens, jnp.int32)
    attn = dict(scale=head_dim ** -0.5, sliding_window=kw.pop("sliding_window", None),
                soft_cap=kw.pop("soft_cap", None))
    if kw.pop("alibi", False):
        attn["alibi_slopes"] = jnp.asarray(rng.uniform(0.01, 0.5, num_heads), jnp.float32)
    out = paged_decode_attention(q, k, v, bt, seq_lens, interpret=True, **attn, **kw)
    ref = paged_decode_attention_reference(q, k, v, bt, seq_lens, **attn)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref) < TOL[dtype]
    np.testing.assert_array_equal(np.asarray(out[4], np.float32), 0.0)  # padding row
    if dtype == jnp.float32:
        ref64 = _numpy_attention(q, k, v, bt, np.arange(len(lens)), np.asarray(lens) - 1, **attn)
        assert _rel(out, ref64) < 1e-4
        assert _rel(ref, ref64) < 1e-4


def _mixed_batch(rng, lens, new_tokens):
    """Token list of a mixed step: sequence s contributes its last new_tokens[s] positions;
    the order is shuffled (the kernel must not rely on grouping)."""
    seq_ids, positions = [], []
    for s, (n, m) in enumerate(zip(lens, new_tokens)):
        seq_ids += [s] * m
        positions += list(range(n - m, n))
    order = rng.permutation(len(seq_ids))
    return (jnp.asarray(np.asarray(seq_ids)[order], jnp.int32),
            jnp.asarray(np.asarray(positions)[order], jnp.int32))


PREFILL_CASES = [
    ("gqa4-d64-f32", 2, 4, 64, jnp.float32, dict(block_q=4, pages_per_compute_block=2)),
    ("mha-d128-bf16", 2, 1, 128, jnp.bfloat16, dict(block_q=16)),
    ("gqa8-d80-window-cap-alibi-f32", 1, 8, 80, jnp.float32,
     dict(block_q=2, sliding_window=13, soft_cap=3.0, alibi=True)),
    ("mqa8-d256-bf16", 1, 8, 256, jnp.bfloat16, dict(block_q=2, pages_per_compute_block=1)),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_mixed_kernel(case):
    _, num_kv, group, head_dim, dtype, kw = case
    kw = dict(kw)
    rng = np.random.default_rng()
    lens = [1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 3]
    new = [1, BLOCK - 1, 1, 3, 2 * BLOCK + 1]  # whole prompts, decodes, chunked prefill
    num_heads = num_kv * group
    k, v = _cache(rng, num_kv, head_dim, 24, dtype)
    bt = _tables(rng, lens, 7, 24)
    seq_ids, positions = _mixed_batch(rng, lens, new)
    q = jnp.asarray(rng.standard_normal((seq_ids.shape[0], num_heads, head_dim)), dtype)
    attn = dict(scale=head_dim ** -0.5, sliding_window=kw.pop("sliding_window", None),
                soft_cap=kw.pop("soft_cap", None))
    if kw.pop("alibi", False):
        attn["alibi_slopes"] = jnp.asarray(rng.uniform(0.01, 0.5, num_heads), jnp.float32)
    out = paged_attention(q, k, v, bt, seq_ids, positions, interpret=True, **attn, **kw)
    ref = paged_attention_reference(q, k, v, bt, seq_ids, positions, **attn)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref) < TOL[dtype]
    if dtype == jnp.float32:
        ref64 = _numpy_attention(q, k, v, bt, seq_ids, positions, **attn)
        assert _rel(out, ref64) < 1e-4


def test_mixed_kernel_decode_equivalence():
    """The mixed kernel on one token per sequence equals the decode kernel."""
    rng = np.random.default_rng()
    lens = [3, BLOCK + 2, 4 * BLOCK]
    k, v = _cache(rng, 2, 64, 16, jnp.float32)
    bt = _tables(rng, lens, 5, 16)
    q = jnp.asarray(rng.standard_normal((3, 4, 64)), jnp.float32)
    seq_lens = jnp.asarray(lens, jnp.int32)
    dec = paged_decode_attention(q, k, v, bt, seq_lens, scale=0.125, interpret=True,
                                 num_splits=2, pages_per_compute_block=1)
    mix = paged_attention(q, k, v, bt, jnp.arange(3, dtype=jnp.int32), seq_lens - 1,
                          scale=0.125, interpret=True, block_q=8, pages_per_compute_block=1)
    assert _rel(dec, mix) < 1e-5


def test_write_kv_pages():
    rng = np.random.default_rng()
    k, v = _cache(rng, 2, 8, 4, jnp.float32)
    slots = jnp.asarray([BLOCK + 3, 2 * BLOCK, 0], jnp.int32)
    kn = jnp.asarray(rng.standard_normal((3, 2, 8)), jnp.float32)
    vn = jnp.asarray(rng.standard_normal((3, 2, 8)), jnp.float32)
    k2, v2 = write_kv_pages(k, v, kn, vn, slots)
    np.testing.assert_array_equal(np.asarray(k2[:, 1, 3]), np.asarray(kn[0]))
    np.testing.assert_array_equal(np.asarray(v2[:, 2, 0]), np.asarray(vn[1]))
    np.testing.assert_array_equal(np.asarray(k2[:, 3]), np.asarray(k[:, 3]))


def test_select_backend():
    assert select_backend("cpu") == "xla"
    assert select_backend("cpu", "xla") == "xla"
    assert select_backend("gpu") == pallas_kernels.BEST_GPU_BACKEND
    assert select_backend("cuda", "triton") == "triton"
    assert select_backend("gpu", "xla") == "xla"
    with pytest.raises(ValueError, match="'flash'"):
        select_backend("gpu", "flash")
    with pytest.raises(ValueError, match="needs a GPU"):
        select_backend("cpu", "triton")


def test_decode_rejects_unknown_backend():
    q = jnp.zeros((1, 2, 64), jnp.float32)
    k = jnp.zeros((1, 2, BLOCK, 64), jnp.float32)
    with pytest.raises(ValueError, match="'bogus'"):
        paged_decode_attention(q, k, k, jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32),
                               scale=1.0, backend="bogus", interpret=True)

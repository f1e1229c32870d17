"""Small fused kernels for the decoder's glue (Pallas, Triton backend), with XLA references.

At batch 1 a Llama-3-8B decode token ran 622 GPU kernels on an H200, 18 per layer: the
four projections stream the weights at 83-106% of the copy bandwidth, but twelve small
fusions (residual adds, the norm's reduction and scaling, rotary embeddings of q and k,
the value slice, the two KV-cache writes) took ~1.4 us each plus a launch gap
(benchmarks/step_profile.py, ``step_profile-nvidia-h200-*.json``). Two kernels replace
eight of them per layer:

  add_rms_norm(x, delta, scale)      x + delta and RMSNorm(x + delta): 3 kernels -> 1
  rope_write_kv(qkv, cos, sin, ...)  q/k rotary, q/k/v split, K/V page writes: 5 -> 1

Both are row-local (one program per token, or per token and KV head) and address their
operands through flat element offsets with masked loads and stores, so any hidden size
or head_dim works (Triton needs power-of-two tiles: the tile is padded in registers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, ArrayLike, Float, Int32

from pallas_kernels.array_types import KVPages

try:  # Deprecated in JAX 0.11 but still functional on CUDA GPUs.
    from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover
    plt = None


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _load(ref, offs, mask):
    return plt.load(ref.at[offs], mask=mask, other=0)


def _store(ref, offs, value, mask):
    plt.store(ref.at[offs], value, mask=mask)


# -- residual add + RMSNorm ----------------------------------------------------------------


def add_rms_norm_reference(x: Float[ArrayLike, "tokens embed"], delta: Float[ArrayLike, "tokens embed"] | None, scale: Float[ArrayLike, "embed"], *, eps: float,
                           scale_plus_one: bool = False) -> tuple[Float[Array, "tokens embed"], Float[Array, "tokens embed"]]:
    """(x + delta, RMSNorm(x + delta) * w) in x's dtype, the norm in float32 (delta None:
    no add). The same arithmetic as ``models.layers.Norm``."""
    if delta is not None:
        x = x + delta
    h = x.astype(jnp.float32)
    h = h * lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    w = scale.astype(jnp.float32)
    return x, (h * (w + 1.0 if scale_plus_one else w)).astype(x.dtype)


def _add_rms_norm_kernel(*refs, size, size_p, eps, plus_one, has_delta):
    if has_delta:
        x_ref, d_ref, w_ref, xo_ref, o_ref = refs
    else:
        x_ref, w_ref, o_ref = refs
    t = pl.program_id(0)
    cols = jnp.arange(size_p)
    mask = cols < size
    offs = t * size + cols
    x = _load(x_ref, offs, mask)
    dtype = x.dtype
    if has_delta:
        # The sum is rounded to the activation dtype, as the unfused residual add is.
        x = (x.astype(jnp.float32) + _load(d_ref, offs, mask).astype(jnp.float32)).astype(dtype)
        _store(xo_ref, offs, x, mask)
    h = x.astype(jnp.float32)
    h = h * lax.rsqrt(jnp.sum(h * h) / size + eps)
    w = _load(w_ref, cols, mask).astype(jnp.float32)
    if plus_one:
        w = w + 1.0
    _store(o_ref, offs, (h * w).astype(dtype), mask)


@functools.partial(jax.jit, static_argnames=("eps", "scale_plus_one", "interpret", "num_warps"))
def add_rms_norm(x: Float[ArrayLike, "tokens embed"], delta: Float[ArrayLike, "tokens embed"] | None, scale: Float[ArrayLike, "embed"], *, eps: float,
                 scale_plus_one: bool = False, interpret: bool = False, num_warps: int | None = None
                 ) -> tuple[Float[Array, "tokens embed"], Float[Array, "tokens embed"]]:
    """x, delta [T, E] (delta may be None), scale [E] -> (x + delta, normed), one kernel."""
    num_tokens, size = x.shape
    size_p = _next_pow2(size)
    has_delta = delta is not None
    flat = pl.BlockSpec((num_tokens * size,), lambda t: (0,))
    args = [x.reshape(-1)] + ([delta.astype(x.dtype).reshape(-1)] if has_delta else []) + [scale]
    in_specs = [flat] * (2 if has_delta else 1) + [pl.BlockSpec((size,), lambda t: (0,))]
    out = jax.ShapeDtypeStruct((num_tokens * size,), x.dtype)
    if num_warps is None:  # one row per program: wide rows get more threads
        num_warps = 8 if size_p >= 4096 else 4  # H200, 4096 wide: 1.52 us at 8 warps, 1.82 at 4
    outs = pl.pallas_call(
        functools.partial(_add_rms_norm_kernel, size=size, size_p=size_p, eps=float(eps),
                          plus_one=scale_plus_one, has_delta=has_delta),
        grid=(num_tokens,),
        in_specs=in_specs,
        out_specs=[flat, flat] if has_delta else [flat],
        out_shape=[out, out] if has_delta else [out],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1) if plt is not None else None,
        interpret=interpret,
        name="add_rms_norm" if has_delta else "rms_norm",
    )(*args)
    if has_delta:
        return outs[0].reshape(x.shape), outs[1].reshape(x.shape)
    return x, outs[0].reshape(x.shape)


# -- rotary embeddings + K/V page writes -----------------------------------------------------


def rope_write_kv_reference(qkv: Float[ArrayLike, "tokens kv_heads parts head_dim"], cos: Float[ArrayLike, "tokens head_dim//2"],
                            sin: Float[ArrayLike, "tokens head_dim//2"], k_pages: KVPages, v_pages: KVPages,
                            slot_mapping: Int32[ArrayLike, "tokens"]) -> tuple[Float[Array, "tokens heads head_dim"],
                                                                           KVPages, KVPages]:
    """qkv [T, KVH, G + 2, D] (per KV head: G query heads, key, value); cos, sin [T, D/2]
    float32 (non-interleaved rotary over all of D) -> (q [T, KVH * G, D] rotated, k_pages,
    v_pages with the rotated keys and the values written at slot_mapping)."""
    from pallas_kernels.reference import write_kv_pages

    num_tokens, kv_heads, g2, head_dim = qkv.shape
    group = g2 - 2

    def rotate(x):  # [T, heads, D]
        dtype = x.dtype
        x = x.astype(jnp.float32)
        half = head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(dtype)

    q = rotate(qkv[:, :, :group].reshape(num_tokens, kv_heads * group, head_dim))
    k = rotate(qkv[:, :, group])
    k_pages, v_pages = write_kv_pages(k_pages, v_pages, k, qkv[:, :, group + 1], slot_mapping)
    return q, k_pages, v_pages


def _rope_write_kv_kernel(slot_ref, qkv_ref, cos_ref, sin_ref, k_in, v_in, q_ref, k_ref, v_ref, *,
                          kv_heads, group, head_dim, group_p, half_p):
    del k_in, v_in  # aliased to k_ref / v_ref
    t, h = pl.program_id(0), pl.program_id(1)
    half = head_dim // 2
    cols = jnp.arange(half_p)
    cmask = cols < half
    base = (t * kv_heads + h) * (group + 2) * head_dim
    c = _load(cos_ref, t * half + cols, cmask)
    s = _load(sin_ref, t * half + cols, cmask)

    def rotated(x1, x2):
        dtype = x1.dtype
        x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
        cc, ss = (c, s) if x1.ndim == 1 else (c[None, :], s[None, :])
        return (x1 * cc - x2 * ss).astype(dtype), (x2 * cc + x1 * ss).astype(dtype)

    # The group's query heads: [group_p, half_p] tiles of first and second halves.
    rows = jnp.arange(group_p)[:, None]
    q_mask = (rows < group) & cmask[None, :]
    offs = base + rows * head_dim + cols[None, :]
    q1, q2 = rotated(_load(qkv_ref, offs, q_mask), _load(qkv_ref, offs + half, q_mask))
    q_offs = ((t * kv_heads + h) * group + rows) * head_dim + cols[None, :]
    _store(q_ref, q_offs, q1, q_mask)
    _store(q_ref, q_offs + half, q2, q_mask)
    # Key (rotated) and value rows into this KV head's pages at the token's slot. Each
    # address is stored once: masked-off lanes must not alias written ones.
    k_offs = base + group * head_dim + cols
    k1, k2 = rotated(_load(qkv_ref, k_offs, cmask), _load(qkv_ref, k_offs + half, cmask))
    v1 = _load(qkv_ref, k_offs + head_dim, cmask)
    v2 = _load(qkv_ref, k_offs + head_dim + half, cmask)
    slot_offs = slot_ref[t] * head_dim + cols
    _store(k_ref, slot_offs, k1, cmask)
    _store(k_ref, slot_offs + half, k2, cmask)
    _store(v_ref, slot_offs, v1, cmask)
    _store(v_ref, slot_offs + half, v2, cmask)


@functools.partial(jax.jit, static_argnames=("interpret", "num_warps"), donate_argnums=(3, 4))
def rope_write_kv(qkv: Float[ArrayLike, "tokens kv_heads parts head_dim"], cos: Float[ArrayLike, "tokens head_dim//2"],
                  sin: Float[ArrayLike, "tokens head_dim//2"], k_pages: KVPages, v_pages: KVPages,
                  slot_mapping: Int32[ArrayLike, "tokens"], *, interpret: bool = False, num_warps: int = 4
                  ) -> tuple[Float[Array, "tokens heads head_dim"], KVPages, KVPages]:
    """One kernel for the rotary embedding of q and k, the q/k/v split and the K/V page
    writes; see ``rope_write_kv_reference``. The pages are updated in place (aliased)."""
    num_tokens, kv_heads, g2, head_dim = qkv.shape
    if head_dim % 2:
        raise ValueError(f"rope_write_kv: head_dim must be even, got {head_dim}")
    _, num_blocks, block_size, _ = k_pages.shape
    kv_size = num_blocks * block_size * head_dim
    if kv_size >= 2**31:
        raise ValueError("rope_write_kv: KV cache too large for int32 offsets within one KV head")
    group = g2 - 2
    half = head_dim // 2
    qkv_flat = qkv.reshape(-1)
    q_size = num_tokens * kv_heads * group * head_dim
    k_flat = k_pages.reshape(kv_heads, kv_size)
    v_flat = v_pages.reshape(kv_heads, kv_size)
    pages = pl.BlockSpec((None, kv_size), lambda t, h: (h, 0))
    trig = pl.BlockSpec((num_tokens * half,), lambda t, h: (0,))
    q, k_flat, v_flat = pl.pallas_call(
        functools.partial(_rope_write_kv_kernel, kv_heads=kv_heads, group=group, head_dim=head_dim,
                          group_p=_next_pow2(group), half_p=_next_pow2(half)),
        grid=(num_tokens, kv_heads),
        in_specs=[pl.BlockSpec((num_tokens,), lambda t, h: (0,)),
                  pl.BlockSpec((qkv_flat.shape[0],), lambda t, h: (0,)), trig, trig, pages, pages],
        out_specs=[pl.BlockSpec((q_size,), lambda t, h: (0,)), pages, pages],
        out_shape=[jax.ShapeDtypeStruct((q_size,), qkv.dtype), jax.ShapeDtypeStruct(k_flat.shape, k_flat.dtype),
                   jax.ShapeDtypeStruct(v_flat.shape, v_flat.dtype)],
        input_output_aliases={4: 1, 5: 2},
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1) if plt is not None else None,
        interpret=interpret,
        name="rope_write_kv",
    )(slot_mapping.astype(jnp.int32), qkv_flat, cos.astype(jnp.float32).reshape(-1),
      sin.astype(jnp.float32).reshape(-1), k_flat, v_flat)
    return (q.reshape(num_tokens, kv_heads * group, head_dim), k_flat.reshape(k_pages.shape),
            v_flat.reshape(v_pages.shape))

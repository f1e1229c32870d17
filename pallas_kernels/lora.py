"""Multi-LoRA matmuls over a batch of tokens that each pick an adapter slot.

Adapters sit stacked in slots (slot 0 = no adapter, all zeros):
  a [S, in, R]       the shrink matrices (rank padded to R)
  b [S, R, out]      the expand matrices (scaling folded in)
Token t uses slot ``slots[t]``: ``delta[t] = (x[t] @ a[slots[t]]) @ b[slots[t]]``.

``lora_shrink`` / ``lora_expand`` are the plain-XLA reference (CPU, and the default):
every token against every non-empty slot, masked to its own (S - 1 small matmuls of a
rank-R width, cheaper than gathering a [T, in, R] copy of A). ``lora_shrink_pallas`` /
``lora_expand_pallas`` are the grouped (BGMV-style) Pallas kernels: one program per
block of tokens x block of features, each token reading only its own slot's rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, ArrayLike, Float, Float32, Int32


def _one_hot(slots, num_slots, dtype):
    """[T] -> [T, S - 1]: 1 where the token uses slot s (slot 0, no adapter, is left out)."""
    return (slots[:, None] == jnp.arange(1, num_slots, dtype=slots.dtype)[None, :]).astype(dtype)


def lora_shrink(x: Float[ArrayLike, "tokens in_features"], a: Float[ArrayLike, "slots in_features rank"],
                slots: Int32[ArrayLike, "tokens"]) -> Float32[Array, "tokens rank"]:
    """x [T, in], a [S, in, R], slots [T] -> [T, R] = x[t] @ a[slots[t]] (f32 accumulate)."""
    h = jnp.einsum("ti,sir->tsr", x, a[1:].astype(x.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("tsr,ts->tr", h, _one_hot(slots, a.shape[0], jnp.float32))


def lora_expand(h: Float[ArrayLike, "tokens rank"], b: Float[ArrayLike, "slots rank out_features"], slots: Int32[ArrayLike, "tokens"],
                out_dtype) -> Float[Array, "tokens out_features"]:
    """h [T, R], b [S, R, out], slots [T] -> [T, out] = h[t] @ b[slots[t]]."""
    masked = h[:, None, :] * _one_hot(slots, b.shape[0], h.dtype)[:, :, None]  # [T, S - 1, R]
    return jnp.einsum("tsr,sro->to", masked.astype(out_dtype), b[1:].astype(out_dtype),
                      preferred_element_type=jnp.float32).astype(out_dtype)


# ---------------------------------------------------------------------------------------
# Pallas (BGMV): tokens in blocks of BLOCK_T, each token's matmul with its own slot.
# ---------------------------------------------------------------------------------------

def _shrink_kernel(slots_ref, x_ref, a_ref, o_ref, *, block_t: int):
    # x_ref [bt, in], a_ref [S, in, R] (whole), o_ref [bt, R]
    for i in range(block_t):
        s = slots_ref[i]
        row = x_ref[pl.ds(i, 1), :].astype(jnp.float32)           # [1, in]
        a = a_ref[s].astype(jnp.float32)                          # [in, R]
        o_ref[pl.ds(i, 1), :] = jnp.dot(row, a) * (s > 0)


def _expand_kernel(slots_ref, h_ref, b_ref, o_ref, *, block_t: int):
    # h_ref [bt, R], b_ref [S, R, bo] (a block of output features), o_ref [bt, bo]
    for i in range(block_t):
        s = slots_ref[i]
        row = h_ref[pl.ds(i, 1), :].astype(jnp.float32)           # [1, R]
        b = b_ref[s].astype(jnp.float32)                          # [R, bo]
        o_ref[pl.ds(i, 1), :] = (jnp.dot(row, b) * (s > 0)).astype(o_ref.dtype)


def _pad_tokens(arrays, slots, block_t):
    num_tokens = slots.shape[0]
    padded = -(-num_tokens // block_t) * block_t
    if padded == num_tokens:
        return arrays, slots
    pad = padded - num_tokens
    arrays = [jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in arrays]
    return arrays, jnp.pad(slots, (0, pad))


@functools.partial(jax.jit, static_argnames=("block_t", "interpret"))
def lora_shrink_pallas(x: Float[ArrayLike, "tokens in_features"], a: Float[ArrayLike, "slots in_features rank"],
                       slots: Int32[ArrayLike, "tokens"], *, block_t: int = 8, interpret: bool = False
                       ) -> Float32[Array, "tokens rank"]:
    """Same contract as ``lora_shrink``."""
    num_tokens = x.shape[0]
    (x,), slots = _pad_tokens([x], slots.astype(jnp.int32), block_t)
    num_slots, in_features, rank = a.shape
    out = pl.pallas_call(
        functools.partial(_shrink_kernel, block_t=block_t),
        grid=(x.shape[0] // block_t,),
        in_specs=[pl.BlockSpec((block_t,), lambda t: (t,)),
                  pl.BlockSpec((block_t, in_features), lambda t: (t, 0)),
                  pl.BlockSpec((num_slots, in_features, rank), lambda t: (0, 0, 0))],
        out_specs=pl.BlockSpec((block_t, rank), lambda t: (t, 0)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], rank), jnp.float32),
        interpret=interpret,
    )(slots, x, a)
    return out[:num_tokens]


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_t", "block_out", "interpret"))
def lora_expand_pallas(h: Float[ArrayLike, "tokens rank"], b: Float[ArrayLike, "slots rank out_features"],
                       slots: Int32[ArrayLike, "tokens"], out_dtype, *, block_t: int = 8, block_out: int = 128,
                       interpret: bool = False) -> Float[Array, "tokens out_features"]:
    """Same contract as ``lora_expand``."""
    num_tokens = h.shape[0]
    (h,), slots = _pad_tokens([h], slots.astype(jnp.int32), block_t)
    num_slots, rank, out_features = b.shape
    block_out = min(block_out, out_features)
    if out_features % block_out:
        raise ValueError(f"out_features={out_features} is not a multiple of block_out={block_out}")
    out = pl.pallas_call(
        functools.partial(_expand_kernel, block_t=block_t),
        grid=(h.shape[0] // block_t, out_features // block_out),
        in_specs=[pl.BlockSpec((block_t,), lambda t, o: (t,)),
                  pl.BlockSpec((block_t, rank), lambda t, o: (t, 0)),
                  pl.BlockSpec((num_slots, rank, block_out), lambda t, o: (0, 0, o))],
        out_specs=pl.BlockSpec((block_t, block_out), lambda t, o: (t, o)),
        out_shape=jax.ShapeDtypeStruct((h.shape[0], out_features), out_dtype),
        interpret=interpret,
    )(slots, h, b)
    return out[:num_tokens]

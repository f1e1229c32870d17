"""Weight-only quantized matmul (W4A16 / W8A16): activations in the model's dtype,
weights as packed integers with per-group scales and zeros (AWQ, GPTQ), or as 4-bit
indices into a per-output-channel codebook (SqueezeLLM).

One packed layout for every method (the loader repacks AWQ and reorders act-order GPTQ
into it; see NOTES.md, "Quantized weights"):

  qweight  [K / P, N] int32, P = 32 / bits values per word, packed along the input:
           bits [b*j, b*j + b) of word r hold row P*r + j (GPTQ's own order)
  scales   [G, N]  group g covers input rows g*group_size .. (g+1)*group_size - 1
  zeros    [G, N]  the integer zero point of each group, as a float
  lut      [16, N] (SqueezeLLM) row i is the value of index i in column n's codebook

  w[k, n] = (q[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n]
  w[k, n] = lut[q[k, n], n]                                      (SqueezeLLM)

Functions (x [M, K] -> [M, N] in x's dtype):
  quant_matmul_reference / lut_matmul_reference    dequantize with XLA, then one matmul
                                                   (the CPU path and the tests' oracle)
  quant_matmul_pallas(..., lut=None | codebook)    the Triton-backend Pallas kernel
  quant_matmul(..., impl)                          dispatch

The Pallas kernel never materializes the dense weight: a program owns ``block_n``
output columns and one split of the input words; per step it loads ``words`` packed rows
[words, block_n] (``words`` x P input rows), and for each of the P bit-planes shifts and
masks in registers, applies the group scale and zero (or the codebook), and multiplies
with the matching activations. Plane j of words r0..r0+words holds the input rows
P*r + j, so the activations are passed plane-major (x2[:, j*K/P + r] = x[:, P*r + j]:
one cheap transpose of the [M, K] activations per call) and each plane's activations are
a contiguous slice. Split-K programs write float32 partials that XLA sums (decode has
few output tiles: Llama-3-8B's o projection is 4096 columns = 32 tiles of 128).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Deprecated in JAX 0.11 but still functional on CUDA GPUs.
    from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover
    plt = None

QUANT_MATMUL_IMPLS = ("xla", "pallas")
SUPPORTED_BITS = (4, 8)


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None  # fp32: not TF32


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _largest_pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def unpack_rows(qweight, bits: int):
    """[K / P, ...] int32 packed along the input -> [K, ...] int32 values in [0, 2^bits)."""
    pack = 32 // bits
    shifts = (jnp.arange(pack, dtype=jnp.int32) * bits).reshape((1, pack) + (1,) * (qweight.ndim - 1))
    values = jnp.bitwise_and(lax.shift_right_logical(qweight[:, None], shifts), (1 << bits) - 1)
    return values.reshape((qweight.shape[0] * pack,) + qweight.shape[1:])


def dequantize(qweight, scales, zeros, *, bits: int, dtype=jnp.float32):
    """The dense weight [K, ...] of a grouped-quantized one (computed in float32: the same
    numbers as a float32 dequantization of the checkpoint, then cast to ``dtype``)."""
    q = unpack_rows(qweight, bits).astype(jnp.float32)
    group_size = q.shape[0] // scales.shape[0]
    s = jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)
    z = jnp.repeat(zeros.astype(jnp.float32), group_size, axis=0)
    return ((q - z) * s).astype(dtype)


def dequantize_lut(qweight, lut, *, bits: int = 4, dtype=jnp.float32):
    """The dense weight [K, ...] of a codebook-quantized one: w[k, n] = lut[q[k, n], n]."""
    q = unpack_rows(qweight, bits)
    return jnp.take_along_axis(lut.astype(jnp.float32), q, axis=0).astype(dtype)


def _matmul(x, w):
    return lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())), precision=_precision(x.dtype))


def quant_matmul_reference(x, qweight, scales, zeros, *, bits: int = 4):
    """x [M, K] @ dequantize(...) [K, ...] -> [M, ...] (XLA: dequantize, then one matmul)."""
    return _matmul(x, dequantize(qweight, scales, zeros, bits=bits))


def lut_matmul_reference(x, qweight, lut, *, bits: int = 4):
    """x [M, K] @ dequantize_lut(...) [K, ...] -> [M, ...]."""
    return _matmul(x, dequantize_lut(qweight, lut, bits=bits))


# ---------------------------------------------------------------------------------------
# Pallas (Triton backend)
# ---------------------------------------------------------------------------------------

def default_pallas_config(m: int, k: int, n: int, bits: int = 4) -> dict:
    """Tile sizes: 128 output columns, 16 packed words per step (128 input rows at 4 bits:
    the K of one tensor-core MMA per plane is 16), and K split until ~128 programs run
    (H200: 132 SMs) while each split keeps >= 4 steps."""
    words_total = k * bits // 32
    block_n = _largest_pow2_divisor(n, 128)
    words = _largest_pow2_divisor(words_total, 16)
    splits = 1
    while (n // block_n) * splits < 128 and words_total % (splits * 2 * words) == 0 \
            and words_total // (splits * 2) >= 4 * words:
        splits *= 2
    return dict(block_n=block_n, words=words, k_splits=splits)


def _quant_kernel(x_ref, q_ref, a_ref, b_ref, out_ref, *, bits, m_pad, n_dim, k_words, words, words_per_split,
                  words_per_group, block_n, lut, precision):
    j_n = pl.program_id(0)
    split = pl.program_id(1)
    pack = 32 // bits
    mask = (1 << bits) - 1
    cols = j_n * block_n + lax.iota(jnp.int32, block_n)
    m_rows = lax.iota(jnp.int32, m_pad)
    x_row_stride = pack * k_words
    if lut:  # the 16 codebook rows of these columns, loaded once
        table = [a_ref[i * n_dim + cols].astype(jnp.float32) for i in range(1 << bits)]

    def body(t, acc):
        r0 = split * words_per_split + t * words
        rows = r0 + lax.iota(jnp.int32, words)                      # packed word rows
        q = q_ref[rows[:, None] * n_dim + cols[None, :]]            # [words, block_n] int32
        if not lut:
            groups = rows // words_per_group                        # one group per word (P rows)
            offs = groups[:, None] * n_dim + cols[None, :]
            scale = a_ref[offs].astype(jnp.float32)
            zero = b_ref[offs].astype(jnp.float32)
        for j in range(pack):
            v = jnp.bitwise_and(lax.shift_right_logical(q, jnp.int32(bits * j)), mask)
            if lut:
                w = jnp.zeros(v.shape, jnp.float32)
                for i, row in enumerate(table):
                    w = jnp.where(v == i, row[None, :], w)
            else:
                w = (v.astype(jnp.float32) - zero) * scale
            xj = x_ref[m_rows[:, None] * x_row_stride + (j * k_words + rows)[None, :]]  # [m_pad, words]
            acc = acc + lax.dot_general(xj, w.astype(xj.dtype), (((1,), (0,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32)
        return acc

    acc = lax.fori_loop(0, words_per_split // words, body, jnp.zeros((m_pad, block_n), jnp.float32))
    offs = (split * m_pad + m_rows)[:, None] * n_dim + cols[None, :]
    plt.store(out_ref.at[offs], acc)


@functools.partial(jax.jit, static_argnames=("bits", "block_n", "words", "k_splits", "num_warps", "num_stages",
                                             "interpret"))
def quant_matmul_pallas(x, qweight, scales=None, zeros=None, lut=None, *, bits: int = 4, block_n: int | None = None,
                        words: int | None = None, k_splits: int | None = None, num_warps: int = 4,
                        num_stages: int = 3, interpret: bool = False):
    """x [M, K] @ the packed weight [K / P, N] -> [M, N] in x's dtype; grouped scales and
    zeros, or a codebook ``lut`` [16, N]. See the module docstring."""
    m, k = x.shape
    k_words, n = qweight.shape
    if k_words * 32 // bits != k:
        raise ValueError(f"quant_matmul_pallas: x has {k} inputs, qweight {qweight.shape} holds "
                         f"{k_words * 32 // bits} at {bits} bits")
    use_lut = lut is not None
    config = default_pallas_config(m, k, n, bits)
    block_n = block_n or config["block_n"]
    words = words or config["words"]
    k_splits = k_splits or config["k_splits"]
    if n % block_n or k_words % (words * k_splits):
        raise ValueError(f"quant_matmul_pallas: block_n={block_n} must divide N={n} and words x k_splits="
                         f"{words} x {k_splits} must divide the {k_words} packed rows")
    words_per_split = k_words // k_splits
    if use_lut:
        a, b, words_per_group = lut.reshape(-1), jnp.zeros((1,), jnp.float32), k_words
    else:
        num_groups = scales.shape[0]
        if k_words % num_groups:
            raise ValueError(f"quant_matmul_pallas: {num_groups} groups do not divide {k_words} packed rows")
        words_per_group = k_words // num_groups
        a, b = scales.reshape(-1), zeros.reshape(-1)
    pack = 32 // bits
    m_pad = max(16, _next_pow2(m))  # the smallest tensor-core MMA has 16 rows
    # Plane-major activations: x2[:, j * K/P + r] = x[:, P*r + j] (see the module docstring).
    x2 = x.reshape(m, k_words, pack).transpose(0, 2, 1).reshape(m, k)
    x2 = jnp.pad(x2, ((0, m_pad - m), (0, 0))).reshape(-1)
    whole = lambda size: pl.BlockSpec((size,), lambda i, s: (0,))  # noqa: E731
    kernel = functools.partial(
        _quant_kernel, bits=bits, m_pad=m_pad, n_dim=n, k_words=k_words, words=words,
        words_per_split=words_per_split, words_per_group=words_per_group, block_n=block_n, lut=use_lut,
        precision=_precision(x.dtype))
    out_size = k_splits * m_pad * n
    out = pl.pallas_call(
        kernel,
        grid=(n // block_n, k_splits),
        in_specs=[whole(x2.shape[0]), whole(k_words * n), whole(a.shape[0]), whole(b.shape[0])],
        out_specs=whole(out_size),
        out_shape=jax.ShapeDtypeStruct((out_size,), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages) if plt else None,
        interpret=interpret,
        name=f"w{bits}a16{'_lut' if use_lut else ''}_n{block_n}_w{words}_s{k_splits}",
    )(x2, qweight.reshape(-1), a, b)
    return jnp.sum(out.reshape(k_splits, m_pad, n), axis=0)[:m].astype(x.dtype)


def quant_matmul(x, qweight, scales=None, zeros=None, lut=None, *, bits: int = 4, impl: str = "xla",
                 interpret: bool = False):
    """x [M, K] @ the packed weight [K / P, N] -> [M, N]; ``impl`` "xla" or "pallas"."""
    if impl == "xla":
        if lut is not None:
            return lut_matmul_reference(x, qweight, lut, bits=bits)
        return quant_matmul_reference(x, qweight, scales, zeros, bits=bits)
    if impl == "pallas":
        return quant_matmul_pallas(x, qweight, scales, zeros, lut, bits=bits, interpret=interpret)
    raise ValueError(f"unknown quantized-matmul implementation {impl!r}; expected one of "
                     f"{', '.join(QUANT_MATMUL_IMPLS)}")

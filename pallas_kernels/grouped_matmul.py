"""Grouped matmul for mixture-of-experts layers: rows sorted by expert, each group of
rows times its own expert matrix.

  grouped_matmul(lhs, rhs, group_sizes, *, impl) -> out
    lhs          [M, K]  rows sorted by group (expert)
    rhs          [G, K, N]
    group_sizes  [G] int32; rows 0 .. sum(group_sizes) - 1 belong to the groups in
                 order, the rows after them are padding and come out as zeros
    out          [M, N] in lhs's dtype

Implementations (``impl``):
  "xla"         plain-XLA reference: every group times every row, masked (reads all
                groups; the CPU path and the oracle of the tests)
  "ragged_dot"  ``jax.lax.ragged_dot``
  "mosaic_gpu"  the Mosaic GPU ragged_dot shipped in ``jax.experimental.pallas.ops.gpu``
                (Hopper; needs K % 64 == 0; padding rows go to the last group, so they
                cost its read)
  "pallas"      the Triton-backend Pallas kernel below: bandwidth-bound decode, where few
                rows hit few experts, reads only the experts that have rows.

The Pallas kernel: the rows of each group are cut into tiles of ``block_m`` rows
(``tile_schedule``: at most cdiv(M, block_m) + G tiles, the active ones first); a
program owns one tile, one ``block_n`` column block and one split of K, loops over K in
``block_k`` steps, and reads only its group's matrix. Tiles past the last active one
exit at once, so an expert without rows is never read. Split-K (``k_splits`` > 1)
writes float32 partials that XLA sums: it keeps the GPU busy when only one or two
experts are hit (decode) and N / block_n is small (the down projection).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, ArrayLike, Float, Int32

try:  # Deprecated in JAX 0.11 but still functional on CUDA GPUs.
    from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover
    plt = None

GROUPED_MATMUL_IMPLS = ("xla", "ragged_dot", "mosaic_gpu", "pallas")


def _cdiv(a, b):
    return (a + b - 1) // b


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None  # fp32: not TF32


def _check(lhs, rhs, group_sizes):
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"grouped_matmul wants lhs [M, K], rhs [G, K, N], group_sizes [G]; got "
                         f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[1] or group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(f"grouped_matmul shapes do not agree: lhs {lhs.shape}, rhs {rhs.shape}, "
                         f"group_sizes {group_sizes.shape}")


def _row_is_grouped(num_rows: int, group_sizes):
    """[M] bool: the row belongs to a group (not padding)."""
    return jnp.arange(num_rows, dtype=jnp.int32) < jnp.sum(group_sizes.astype(jnp.int32))


def grouped_matmul_reference(lhs: Float[ArrayLike, "rows k"], rhs: Float[ArrayLike, "groups k n"],
                             group_sizes: Int32[ArrayLike, "groups"]) -> Float[Array, "rows n"]:
    """Plain XLA: every row times every group's matrix, each row keeping its own group's
    product (one [M, K] x [K, N] matmul per group). Reads all of ``rhs`` whatever the
    routing; exact and simple (CPU, tests, the benchmark's oracle)."""
    _check(lhs, rhs, group_sizes)
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    rows = jnp.arange(lhs.shape[0], dtype=jnp.int32)
    group_of_row = jnp.sum(rows[:, None] >= ends[None, :], axis=1)  # G for padding rows
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    for group in range(rhs.shape[0]):
        product = jnp.dot(lhs, rhs[group].astype(lhs.dtype), precision=_precision(lhs.dtype),
                          preferred_element_type=jnp.float32)
        out = jnp.where((group_of_row == group)[:, None], product, out)
    return out.astype(lhs.dtype)


def tile_schedule(group_sizes, num_rows: int, block_m: int):
    """Cut each group's rows into tiles of at most ``block_m`` rows.

    Returns (tile_group, tile_start, tile_end), each [cdiv(num_rows, block_m) + G] int32:
    tile t covers rows tile_start[t] .. tile_end[t] - 1 of group tile_group[t]. Active
    tiles come first, in group order; the rest are empty (tile_end == tile_start).
    """
    num_groups = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    tiles = (sizes + block_m - 1) // block_m
    tile_ends = jnp.cumsum(tiles)
    tile_starts = tile_ends - tiles
    num_tiles = _cdiv(num_rows, block_m) + num_groups  # sum_g cdiv(s_g, bm) never exceeds this
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    # One compare-and-count (a single fused op; jnp.searchsorted is a loop of launches on a GPU).
    group = jnp.minimum(jnp.sum(t[:, None] >= tile_ends[None, :], axis=1), num_groups - 1).astype(jnp.int32)
    start = starts[group] + (t - tile_starts[group]) * block_m
    end = jnp.minimum(start + block_m, ends[group])
    active = t < tile_ends[-1]
    start = jnp.where(active, start, 0)
    end = jnp.where(active, end, 0)
    return group, start, end


def _gmm_kernel(group_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref, *, num_rows, k_dim, n_dim,
                block_m, block_n, block_k, k_per_split, precision):
    t = pl.program_id(0)
    j = pl.program_id(1)
    split = pl.program_id(2)
    start = start_ref[t]
    end = end_ref[t]
    # Shapes that the blocks divide need no masks on the expert matrix: its loads stay
    # contiguous along N (vectorized), which is what makes the decode case bandwidth-bound.
    even_n = n_dim % block_n == 0
    even_k = k_dim % block_k == 0 and k_per_split % block_k == 0

    @pl.when(end > start)
    def _():
        group = group_ref[t]
        rows = start + lax.iota(jnp.int32, block_m)
        row_ok = rows < end
        safe_rows = jnp.where(row_ok, rows, start)  # per row: the K axis stays contiguous
        cols = j * block_n + lax.iota(jnp.int32, block_n)
        col_ok = cols < n_dim
        k_lo = split * k_per_split
        k_hi = jnp.minimum(k_lo + k_per_split, k_dim)
        num_iters = _cdiv(jnp.maximum(k_hi - k_lo, 0), block_k)
        rhs_base = group * (k_dim * n_dim)

        def body(i, acc):
            ks = k_lo + i * block_k + lax.iota(jnp.int32, block_k)
            x_mask = row_ok[:, None] if even_k else row_ok[:, None] & (ks < k_hi)[None, :]
            x_offs = safe_rows[:, None] * k_dim + (ks if even_k else jnp.minimum(ks, k_dim - 1))[None, :]
            x = plt.load(lhs_ref.at[x_offs], mask=x_mask, other=0)  # [block_m, block_k]
            if even_n and even_k:
                w = rhs_ref[rhs_base + ks[:, None] * n_dim + cols[None, :]]  # [block_k, block_n]
            else:
                w_mask = (ks < k_hi)[:, None] & col_ok[None, :]
                w_offs = rhs_base + jnp.minimum(ks, k_dim - 1)[:, None] * n_dim + jnp.minimum(cols, n_dim - 1)[None, :]
                w = plt.load(rhs_ref.at[w_offs], mask=w_mask, other=0)
            return acc + lax.dot_general(x, w.astype(x.dtype), (((1,), (0,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, num_iters, body, jnp.zeros((block_m, block_n), jnp.float32))
        # Masked rows point past the end (interpret mode writes masked elements back: no aliasing).
        out_rows = jnp.where(row_ok, split * num_rows + rows, out_ref.shape[0] // n_dim)
        offs = out_rows[:, None] * n_dim + cols[None, :]
        out_mask = row_ok[:, None]
        if not even_n:
            out_mask = out_mask & col_ok[None, :]
            offs = jnp.where(out_mask, offs, out_ref.shape[0])
        plt.store(out_ref.at[offs], acc.astype(out_ref.dtype), mask=out_mask)


def default_pallas_config(num_rows: int, num_groups: int, k_dim: int, n_dim: int) -> dict:
    """Tile sizes: 16-row tiles (the smallest tensor-core MMA) when groups are small
    (decode), 64 otherwise; 256 x 128 expert tiles; K split until about 128 programs have
    work when only a few tiles are active. Measured on an H200 at Mixtral-8x7B expert
    shapes, one token top-2 (benchmarks/moe.py --sweep, 2026-11-30): gate/up 0.324 ms
    (n256 k128, 1 split; 128-wide tiles 0.38-0.49), down 0.305 ms (n256 k128, 4 splits;
    1 split 0.355)."""
    block_m = 16 if num_rows <= 4 * num_groups * 16 else 64
    block_n = min(256, max(16, _next_pow2(n_dim)))
    block_k = min(128, max(16, _next_pow2(k_dim)))
    active_tiles = min(num_groups, num_rows) + _cdiv(num_rows, block_m)
    programs = active_tiles * _cdiv(n_dim, block_n)
    k_splits = 1
    while programs * k_splits < 128 and k_dim // (k_splits * 2) >= 4 * block_k:
        k_splits *= 2
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, k_splits=k_splits)


# Shared memory per block on Hopper (227 KiB); Triton keeps num_stages copies of the
# lhs and rhs tiles there.
SHARED_MEMORY_BYTES = 232448


def pipeline_stages(block_m: int, block_n: int, block_k: int, itemsize: int, most: int = 3) -> int:
    """Software-pipeline depth: up to ``most`` stages whose tiles fit shared memory (64-row
    tiles at 256 x 128 need 240 KiB at 3 stages: over the limit on an H200, 2026-11-30)."""
    per_stage = (block_m * block_k + block_k * block_n) * itemsize
    return max(1, min(most, SHARED_MEMORY_BYTES // per_stage))


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "k_splits", "num_warps",
                                             "num_stages", "interpret"))
def grouped_matmul_pallas(lhs, rhs, group_sizes, *, block_m: int | None = None, block_n: int | None = None,
                          block_k: int | None = None, k_splits: int | None = None, num_warps: int = 4,
                          num_stages: int | None = None, interpret: bool = False):
    """The Pallas (Triton backend) grouped matmul; see the module docstring. Tuning
    values left None come from ``default_pallas_config``."""
    _check(lhs, rhs, group_sizes)
    num_rows, k_dim = lhs.shape
    num_groups, _, n_dim = rhs.shape
    if num_groups * k_dim * n_dim >= 2**31:
        raise ValueError(f"grouped_matmul_pallas: rhs {rhs.shape} too large for int32 offsets")
    config = default_pallas_config(num_rows, num_groups, k_dim, n_dim)
    block_m = block_m or config["block_m"]
    block_n = block_n or config["block_n"]
    block_k = block_k or config["block_k"]
    k_splits = k_splits or config["k_splits"]
    num_stages = num_stages or pipeline_stages(block_m, block_n, block_k, lhs.dtype.itemsize)
    k_per_split = _cdiv(_cdiv(k_dim, k_splits), block_k) * block_k
    k_splits = _cdiv(k_dim, k_per_split)
    group, start, end = tile_schedule(group_sizes, num_rows, block_m)
    num_tiles = group.shape[0]
    out_dtype = lhs.dtype if k_splits == 1 else jnp.float32
    out_size = k_splits * num_rows * n_dim
    whole = lambda size: pl.BlockSpec((size,), lambda t, j, s: (0,))  # noqa: E731
    kernel = functools.partial(
        _gmm_kernel, num_rows=num_rows, k_dim=k_dim, n_dim=n_dim, block_m=block_m, block_n=block_n,
        block_k=block_k, k_per_split=k_per_split, precision=_precision(lhs.dtype))
    out = pl.pallas_call(
        kernel,
        grid=(num_tiles, _cdiv(n_dim, block_n), k_splits),
        in_specs=[whole(num_tiles), whole(num_tiles), whole(num_tiles), whole(num_rows * k_dim),
                  whole(num_groups * k_dim * n_dim)],
        out_specs=whole(out_size),
        out_shape=jax.ShapeDtypeStruct((out_size,), out_dtype),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages) if plt else None,
        interpret=interpret,
        name=f"grouped_matmul_m{block_m}_n{block_n}_k{block_k}_s{k_splits}",
    )(group, start, end, lhs.reshape(-1), rhs.reshape(-1))
    out = out.reshape(k_splits, num_rows, n_dim)
    out = out[0] if k_splits == 1 else jnp.sum(out, axis=0)
    # Rows no tile wrote (padding) hold whatever the buffer held: zero them.
    return jnp.where(_row_is_grouped(num_rows, group_sizes)[:, None], out, 0).astype(lhs.dtype)


# Jitted so that a model's 32 layers lower it once: Mosaic GPU's layout inference runs
# in Python for every pallas_call it lowers (~2.7 s each at Mixtral shapes, H200 run
# 2026-11-30: 64 un-jitted calls made the 2048-token step take ~3 minutes to lower), and
# JAX emits one function for identical jitted calls.
@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "max_concurrent_steps",
                                             "grid_block_n"))
def grouped_matmul_mosaic(lhs, rhs, group_sizes, *, block_m: int = 64, block_n: int = 128, block_k: int = 64,
                          max_concurrent_steps: int = 4, grid_block_n: int = 1):
    """JAX's Mosaic GPU ragged_dot (Hopper). It wants the groups to cover every row, so
    the padding rows join the last group (then zeroed)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    _check(lhs, rhs, group_sizes)
    num_rows = lhs.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    sizes = sizes.at[-1].add(num_rows - jnp.sum(sizes))
    out = ragged_dot_mgpu.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes=sizes, block_m=block_m,
                                     block_n=block_n, block_k=block_k, max_concurrent_steps=max_concurrent_steps,
                                     grid_block_n=grid_block_n)
    return jnp.where(_row_is_grouped(num_rows, group_sizes)[:, None], out, 0).astype(lhs.dtype)


def grouped_matmul_ragged_dot(lhs, rhs, group_sizes):
    """``jax.lax.ragged_dot`` (rows past the groups come out as zeros)."""
    _check(lhs, rhs, group_sizes)
    return jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32),
                              precision=_precision(lhs.dtype), preferred_element_type=jnp.float32
                              ).astype(lhs.dtype)


def grouped_matmul(lhs: Float[ArrayLike, "rows k"], rhs: Float[ArrayLike, "groups k n"], group_sizes: Int32[ArrayLike, "groups"],
                   *, impl: str = "xla", interpret: bool = False) -> Float[Array, "rows n"]:
    """[M, K] rows sorted by group x [G, K, N] -> [M, N]; see the module docstring."""
    if impl == "xla":
        return grouped_matmul_reference(lhs, rhs, group_sizes)
    if impl == "ragged_dot":
        return grouped_matmul_ragged_dot(lhs, rhs, group_sizes)
    if impl == "mosaic_gpu":
        return grouped_matmul_mosaic(lhs, rhs, group_sizes)
    if impl == "pallas":
        return grouped_matmul_pallas(lhs, rhs, group_sizes, interpret=interpret)
    raise ValueError(f"unknown grouped-matmul implementation {impl!r}; expected one of "
                     f"{', '.join(GROUPED_MATMUL_IMPLS)}")

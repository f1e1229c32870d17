"""Pallas paged attention for chunked prefill and mixed steps (Triton backend).

Same result as `reference.paged_attention_reference`: every query token attends
causally (and within `sliding_window`) to the keys of its own sequence, which are
already in the paged cache (the cached prefix plus this step's tokens).

How a general batch becomes tiles (plain XLA, O(num_tokens) work):
  1. tokens are stably sorted by `token_seq_ids`, so each sequence's tokens are adjacent
     (the engine already orders them so; the sort makes any order correct);
  2. each sequence's tokens are cut into query tiles of `block_q` tokens; a tile never
     mixes sequences. A tile holds block_q tokens x group query heads of ONE KV head as
     block_q * group_p rows, so the K/V tiles are read once for the whole GQA group;
  3. per tile: its sequence, the first block that can be visible (sliding window) and the
     number of blocks up to the tile's largest position, plus each row's position.
The kernel (grid = tiles x KV heads) then runs a flash-attention loop over the tile's
pages (gathered through the block table), masking key_pos <= row position (and
> position - window), and writes normalised rows; XLA scatters them back to token order.

Decode tokens inside a mixed batch become one tile each (memory-bound, like decode).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, ArrayLike, Float, Int32

from pallas_kernels.array_types import KVPages
from pallas_kernels.paged_decode import (_next_pow2, check_paged_inputs, key_scores, load_rows, online_softmax_step,
                                         page_offsets, plt)
from pallas_kernels.reference import MASK_VALUE



def _prefill_kernel(tile_seq_ref, tile_first_ref, tile_end_ref, bt_ref, row_pos_ref, q_ref,
                    k_ref, v_ref, *rest, scale, block_size, head_dim, head_dim_p, pages,
                    max_blocks, sliding_window, soft_cap, has_alibi, precision):
    if has_alibi:
        slopes_ref, o_ref = rest
    else:
        (o_ref,) = rest
    t = pl.program_id(0)
    block_k = pages * block_size
    seq = tile_seq_ref[t]
    first = tile_first_ref[t]
    end = tile_end_ref[t]
    num_iters = lax.div(jnp.maximum(end - first, 0) + pages - 1, pages)

    q = q_ref[...]  # [rows, head_dim_p]
    rows = q.shape[0]
    pos = row_pos_ref[...]  # [rows] int32, -1 for padding rows
    tok = lax.iota(jnp.int32, block_k)
    dim = lax.iota(jnp.int32, head_dim_p)
    dmask = (dim < head_dim)[None, :] if head_dim_p != head_dim else None
    bt_row = seq * max_blocks
    if has_alibi:
        slopes = slopes_ref[...].astype(jnp.float32)  # [rows]

    def body(i, carry):
        acc, m, l = carry
        blk0 = first + i * pages
        offs = page_offsets(bt_ref, bt_row, blk0, end, tok, dim, block_size=block_size,
                            max_blocks=max_blocks, head_dim=head_dim)
        sc = key_scores(q, load_rows(k_ref, offs, dmask), scale, soft_cap, precision)  # [rows, block_k]
        key_pos = blk0 * block_size + tok
        rel = key_pos[None, :] - pos[:, None]  # <= 0 is visible
        if has_alibi:
            sc = sc + slopes[:, None] * rel.astype(jnp.float32)
        mask = rel <= 0
        if sliding_window is not None:
            mask = mask & (rel > -sliding_window)
        return online_softmax_step(acc, m, l, sc, mask, load_rows(v_ref, offs, dmask), precision)

    init = (jnp.zeros((rows, head_dim_p), jnp.float32),
            jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_iters, body, init)
    inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
    o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)


def build_tiles(token_seq_ids, positions, *, block_q: int, num_seq_rows: int, block_size: int,
                sliding_window: int | None):
    """Group tokens into single-sequence query tiles. Returns (num_tiles static, perm,
    tile_id, row, tile_seq, tile_first_block, tile_end_block)."""
    num_tokens = token_seq_ids.shape[0]
    num_tiles = min(num_tokens, -(-num_tokens // block_q) + min(num_tokens, num_seq_rows))
    sid_in = token_seq_ids.astype(jnp.int32)
    perm = jnp.argsort(sid_in, stable=True).astype(jnp.int32)
    sid = sid_in[perm]
    pos = positions.astype(jnp.int32)[perm]
    idx = jnp.arange(num_tokens, dtype=jnp.int32)
    new_seq = jnp.concatenate([jnp.ones((1,), bool), sid[1:] != sid[:-1]])
    seq_start = lax.cummax(jnp.where(new_seq, idx, 0))
    r = idx - seq_start
    row = r % block_q
    tile_id = jnp.cumsum((new_seq | (row == 0)).astype(jnp.int32)) - 1
    tile_seq = jnp.zeros((num_tiles,), jnp.int32).at[tile_id].set(sid)
    hi = jnp.full((num_tiles,), -1, jnp.int32).at[tile_id].max(pos)
    tile_end = jnp.where(hi >= 0, hi // block_size + 1, 0).astype(jnp.int32)
    if sliding_window is None:
        tile_first = jnp.zeros((num_tiles,), jnp.int32)
    else:
        big = jnp.iinfo(jnp.int32).max
        lo = jnp.full((num_tiles,), big, jnp.int32).at[tile_id].min(pos)
        lo = jnp.where(lo == big, 0, lo)
        tile_first = (jnp.maximum(lo - sliding_window + 1, 0) // block_size).astype(jnp.int32)
    return num_tiles, perm, tile_id, row, tile_seq, tile_first, tile_end, pos


@functools.partial(
    jax.jit,
    static_argnames=("scale", "sliding_window", "soft_cap", "interpret", "backend", "block_q",
                     "block_m", "pages_per_compute_block", "num_warps", "num_stages"))
def paged_attention(q: Float[ArrayLike, "tokens heads head_dim"], k_pages: KVPages, v_pages: KVPages,
                    block_tables: Int32[ArrayLike, "seqs max_blocks"], token_seq_ids: Int32[ArrayLike, "tokens"],
                    positions: Int32[ArrayLike, "tokens"], *, scale: float, sliding_window: int | None = None,
                    soft_cap: float | None = None, alibi_slopes: Float[ArrayLike, "heads"] | None = None,
                    num_blocks_to_scan=None,
                    interpret: bool = False, backend: str = "triton",
                    block_q: int | None = None, block_m: int | None = None,
                    pages_per_compute_block: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None) -> Float[Array, "tokens heads head_dim"]:
    """Mixed / chunked-prefill paged attention with the signature of
    `reference.paged_attention_reference`. Returns [num_tokens, num_heads, head_dim].

    `num_blocks_to_scan` is accepted for signature compatibility and not needed: each
    tile's loop already stops at its largest position. Tuning (static): block_m = query
    rows per program (block_q tokens x padded group; default 128 rows, >= 16), or
    block_q directly; pages_per_compute_block (default 64 keys), num_warps, num_stages.
    """
    del num_blocks_to_scan
    check_paged_inputs("paged_attention", backend, q, k_pages, v_pages)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    group_p = _next_pow2(group)
    head_dim_p = _next_pow2(head_dim)
    max_blocks = block_tables.shape[1]
    if block_q is None:
        block_m = block_m or (128 if head_dim_p <= 128 else 64)
        block_q = max(1, block_m // group_p)
    block_q = _next_pow2(block_q)
    block_q = max(block_q, _next_pow2(-(-16 // group_p)))  # >= 16 rows for the MMA
    rows = block_q * group_p
    if pages_per_compute_block is None:
        pages_per_compute_block = max(1, 64 // block_size)
    pages = pages_per_compute_block

    (num_tiles, perm, tile_id, row, tile_seq, tile_first, tile_end, pos_sorted) = build_tiles(
        token_seq_ids, positions, block_q=block_q, num_seq_rows=block_tables.shape[0],
        block_size=block_size, sliding_window=sliding_window)

    # Gather q into tiles: [num_tiles, K, rows, head_dim_p]; row = token_in_tile*group_p + g.
    slot = tile_id * block_q + row  # sorted token -> flat tile slot
    tile_tok = jnp.full((num_tiles * block_q,), num_tokens, jnp.int32).at[slot].set(perm)
    row_pos_tok = jnp.full((num_tiles * block_q,), -1, jnp.int32).at[slot].set(pos_sorted)
    q_pad = jnp.concatenate([q, jnp.zeros((1, num_heads, head_dim), q.dtype)], axis=0)
    qt = q_pad[tile_tok].reshape(num_tiles, block_q, num_kv_heads, group, head_dim)
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, 0), (0, group_p - group), (0, head_dim_p - head_dim)))
    qt = qt.transpose(0, 2, 1, 3, 4).reshape(num_tiles, num_kv_heads, rows, head_dim_p)
    row_pos = jnp.repeat(row_pos_tok.reshape(num_tiles, block_q), group_p, axis=1)
    if group_p != group:  # padded heads: fully masked rows
        valid = jnp.tile(jnp.arange(group_p) < group, block_q)
        row_pos = jnp.where(valid[None, :], row_pos, -1)

    k_flat = k_pages.reshape(num_kv_heads, num_blocks * block_size * head_dim)
    v_flat = v_pages.reshape(num_kv_heads, num_blocks * block_size * head_dim)
    bt_flat = block_tables.astype(jnp.int32).reshape(-1)
    kv_size = num_blocks * block_size * head_dim
    nt = num_tiles
    in_specs = [
        pl.BlockSpec((nt,), lambda t, h: (0,)),
        pl.BlockSpec((nt,), lambda t, h: (0,)),
        pl.BlockSpec((nt,), lambda t, h: (0,)),
        pl.BlockSpec((bt_flat.shape[0],), lambda t, h: (0,)),
        pl.BlockSpec((None, rows), lambda t, h: (t, 0)),
        pl.BlockSpec((None, None, rows, head_dim_p), lambda t, h: (t, h, 0, 0)),
        pl.BlockSpec((None, kv_size), lambda t, h: (h, 0)),
        pl.BlockSpec((None, kv_size), lambda t, h: (h, 0)),
    ]
    args = [tile_seq, tile_first, tile_end, bt_flat, row_pos, qt, k_flat, v_flat]
    has_alibi = alibi_slopes is not None
    if has_alibi:
        sl = jnp.asarray(alibi_slopes, jnp.float32).reshape(num_kv_heads, group)
        sl = jnp.tile(jnp.pad(sl, ((0, 0), (0, group_p - group))), (1, block_q))
        in_specs.append(pl.BlockSpec((None, rows), lambda t, h: (h, 0)))
        args.append(sl)
    kernel = functools.partial(
        _prefill_kernel, scale=float(scale), block_size=block_size, head_dim=head_dim,
        head_dim_p=head_dim_p, pages=pages, max_blocks=max_blocks,
        sliding_window=sliding_window, soft_cap=soft_cap, has_alibi=has_alibi,
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)  # not TF32
    compiler_params = None
    if plt is not None:
        compiler_params = plt.CompilerParams(num_warps=num_warps or 4, num_stages=num_stages or 2)
    o = pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, rows, head_dim_p), lambda t, h: (t, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((num_tiles, num_kv_heads, rows, head_dim_p), q.dtype),
        compiler_params=compiler_params,
        interpret=interpret,
        name=f"paged_prefill_q{block_q}_p{pages}",
    )(*args)
    o = o.reshape(num_tiles, num_kv_heads, block_q, group_p, head_dim_p)
    o = o.transpose(0, 2, 1, 3, 4)[:, :, :, :group, :head_dim]
    o = o.reshape(num_tiles * block_q, num_heads, head_dim)
    inv = jnp.zeros((num_tokens,), jnp.int32).at[perm].set(slot)
    return o[inv]

"""The XLA paged attention the engine runs where there are no Pallas kernels (the CPU):
same semantics as :mod:`pallas_kernels.reference` (which stays the oracle), with a cost
that follows the tokens in context instead of the block-table width (max_model_len).

* Decode: each query gathers its own sequence's keys, a few blocks at a time, for as
  many chunks as the longest live sequence needs (a run-time trip count).
* Prefill / mixed steps: queries go in tiles of ``query_tile`` tokens. A tile whose
  tokens all belong to one sequence (every tile of a long prompt) attends to that
  sequence's keys as real matrix products, key chunk by key chunk, only over the key
  range its positions can see (causal and sliding-window limits, so a prompt costs
  about half the full square). Heads stay outermost ([K, G*t, D] against [K, chunk, D])
  so both products are plain batched matmuls, and the key chunks every query of the
  tile sees skip the mask. A tile mixing sequences (a prompt chunk beside decode tokens
  or short prompts) takes the runs that cross its edges (the head or tail of a chunk)
  the same way, and the other tokens gather their own keys a group at a time, each
  group bounded by its own longest context. Tiles of padding only are skipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int32

from pallas_kernels.array_types import KVPages
from pallas_kernels.reference import (
    NOT_VISIBLE, online_softmax_init, online_softmax_update, paged_attention_reference)

# Measured on a 2-core CPU with SmolLM2-135M's shapes (a 2,048-token chunk after 2,048
# cached tokens, one layer: 128 x 256 took 236 ms of CPU, 256 x 256 217 ms, 256 x 512
# 226 ms, 512 x 512 277 ms): 256-token query tiles against 256-token key chunks keep the
# products large enough for the CPU's matmul kernels while wasting at most one chunk per
# tile past the causal edge.
QUERY_TILE = 256
KEY_CHUNK_BLOCKS = 16
# Attention among a step's own tokens (an encoder, a training forward) holds
# [tile, H, T] scores at a time.
PACKED_QUERY_TILE = 128
# Decode queries gather their keys per token: small chunks keep that bounded by the
# live context (128 tokens of waste at most per sequence).
DECODE_CHUNK_BLOCKS = 8
# Tokens of a mixed tile that gather their own keys go this many at a time, each group
# up to its own longest context (a few short prompts beside a long chunk read little).
GATHER_ROWS = 32
# A run of one sequence's tokens in a mixed tile goes as matrix products from
# tile / MIN_RUN_FRACTION tokens on (below that, per-token gathers cost less).
MIN_RUN_FRACTION = 8

_PADDING_ONLY, _ONE_SEQUENCE, _MIXED = 0, 1, 2


def paged_decode_attention_xla(q: Float[ArrayLike, "queries heads head_dim"], k_pages: KVPages, v_pages: KVPages,
                               block_tables: Int32[ArrayLike, "queries max_blocks"], seq_lens: Int32[ArrayLike, "queries"], *,
                               scale: float, sliding_window=None, soft_cap=None,
                               alibi_slopes: Float[ArrayLike, "heads"] | None = None, relative_bias=None,
                               num_seqs: int | None = None, chunk_blocks: int = DECODE_CHUNK_BLOCKS
                               ) -> Float[Array, "queries heads head_dim"]:
    """One query per row at position seq_lens - 1 (as
    :func:`reference.paged_decode_attention_reference`); keys are read in chunks of
    ``chunk_blocks`` blocks up to the longest live sequence only. ``num_seqs``: the
    sequences of the step when its queries are more (a verify step's k+1 each): chunks
    are sized as for a decode of that many, so each query's result is bit for bit a
    plain decode's."""
    block_size = k_pages.shape[2]
    num_queries = q.shape[0]
    return paged_attention_reference(
        q, k_pages, v_pages, block_tables,
        token_seq_ids=jnp.arange(num_queries, dtype=jnp.int32), positions=seq_lens - 1,
        scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, alibi_slopes=alibi_slopes,
        relative_bias=relative_bias, num_blocks_to_scan=(jnp.max(seq_lens) + block_size - 1) // block_size,
        max_chunk_blocks=chunk_blocks, gather_rows=num_seqs)


def paged_attention_xla(q: Float[ArrayLike, "tokens heads head_dim"], k_pages: KVPages, v_pages: KVPages,
                        block_tables: Int32[ArrayLike, "seqs max_blocks"], token_seq_ids: Int32[ArrayLike, "tokens"],
                        positions: Int32[ArrayLike, "tokens"], *, scale: float, sliding_window=None, soft_cap=None,
                        alibi_slopes: Float[ArrayLike, "heads"] | None = None, relative_bias=None,
                        is_padding: Bool[ArrayLike, "tokens"] | None = None, query_tile: int = QUERY_TILE,
                        key_chunk_blocks: int = KEY_CHUNK_BLOCKS, gather_rows: int = GATHER_ROWS
                        ) -> Float[Array, "tokens heads head_dim"]:
    """Causal attention of each query token over its sequence's paged keys (the rule of
    :func:`reference.paged_attention_reference`), tiled as the module docstring says.

    q [T, H, D]; token_seq_ids, positions [T] int32; is_padding [T] bool (optional):
    tokens whose output is never read (they neither split a tile nor extend its key
    range). Returns [T, H, D] in q's dtype (zeros for tiles of padding only)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, block_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    if is_padding is None:
        is_padding = jnp.zeros((num_tokens,), jnp.bool_)

    tile = min(query_tile, num_tokens)
    num_tiles = -(-num_tokens // tile)
    extra = num_tiles * tile - num_tokens
    if extra:
        q = jnp.pad(q, ((0, extra), (0, 0), (0, 0)))
        token_seq_ids = jnp.pad(token_seq_ids, (0, extra), mode="edge")
        positions = jnp.pad(positions, (0, extra))
        is_padding = jnp.pad(is_padding, (0, extra), constant_values=True)

    chunk_blocks = max(1, min(key_chunk_blocks, max_blocks))
    chunk_len = chunk_blocks * block_size
    num_chunks_static = -(-max_blocks // chunk_blocks)
    tables = jnp.pad(block_tables, ((0, 0), (0, num_chunks_static * chunk_blocks - max_blocks)))
    slopes = None
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(num_kv_heads, group)
    softmax = dict(sliding_window=sliding_window, soft_cap=soft_cap, slopes=slopes, relative_bias=relative_bias,
                   heads_first=True)
    big = jnp.iinfo(jnp.int32).max
    min_run = max(1, tile // MIN_RUN_FRACTION)

    def one_sequence(q_tile, seq, pos, mine):
        """The tile's queries against sequence ``seq``'s keys as matrix products; only the
        rows where ``mine`` are meaningful (the key range follows them alone; the other
        rows come out finite and are dropped by the caller)."""
        table = tables[seq]
        hi = jnp.max(jnp.where(mine, pos, 0))
        first = jnp.min(jnp.where(mine, pos, big))
        lo = 0 if sliding_window is None else jnp.maximum(first - sliding_window + 1, 0)
        # Chunks [full_lo, full_hi) are visible to every query of the tile: no mask there.
        full_hi = (first + 1) // chunk_len
        full_lo = 0 if sliding_window is None else -(-(hi - sliding_window + 1) // chunk_len)
        # [K, G*t, D]: heads outermost, so both products are batched matmuls over K.
        qk = (jnp.transpose(q_tile.astype(jnp.float32).reshape(tile, num_kv_heads, group, head_dim), (1, 2, 0, 3))
              .reshape(num_kv_heads, group * tile, head_dim) * scale)

        def body(c, carry, masked):
            blocks = jax.lax.dynamic_slice_in_dim(table, c * chunk_blocks, chunk_blocks)
            k = k_pages[:, blocks].astype(jnp.float32).reshape(num_kv_heads, chunk_len, head_dim)
            v = v_pages[:, blocks].astype(jnp.float32).reshape(num_kv_heads, chunk_len, head_dim)
            s = jax.lax.dot_general(qk, k, (((2,), (2,)), ((0,), (0,))))  # [K, G*t, chunk]
            rel = (c * chunk_len + jnp.arange(chunk_len))[None, :] - pos[:, None]  # [t, chunk]

            def weighted_values(p):  # [K, G, t, chunk] -> [K, G, t, D]
                pv = jax.lax.dot_general(p.reshape(num_kv_heads, group * tile, chunk_len), v,
                                         (((2,), (1,)), ((0,), (0,))))
                return pv.reshape(num_kv_heads, group, tile, head_dim)

            return online_softmax_update(carry, s.reshape(num_kv_heads, group, tile, chunk_len), rel,
                                         weighted_values, masked=masked, **softmax)

        def any_chunk(c, carry):  # (the cond passes the cache by reference: measured, no copies)
            full = (c >= full_lo) & (c < full_hi)
            return jax.lax.cond(full, functools.partial(body, masked=False), functools.partial(body, masked=True),
                                c, carry)

        init = online_softmax_init(tile, num_kv_heads, group, head_dim, heads_first=True)
        _, l, acc = jax.lax.fori_loop(lo // chunk_len, hi // chunk_len + 1, any_chunk, init)
        out = acc / jnp.maximum(l, 1e-30)[..., None]  # [K, G, t, D]
        return jnp.transpose(out, (2, 0, 1, 3)).reshape(tile, num_heads, head_dim).astype(q.dtype)

    def per_token(q_tile, seq_ids, pos, mine):
        """The tokens where ``mine`` each gather their own sequence's keys (the reference
        rule), ``gather_rows`` at a time (moved to the front first), each group up to its
        own longest context: the cost follows those tokens, not the tile."""
        rows = min(gather_rows, tile)
        num_groups = -(-tile // rows)
        order = jnp.argsort(~mine, stable=True)  # the tokens of ``mine`` first, in order
        padded = num_groups * rows - tile
        q_rows = jnp.pad(q_tile[order], ((0, padded), (0, 0), (0, 0)))
        seq_rows, pos_rows = jnp.pad(seq_ids[order], (0, padded)), jnp.pad(pos[order], (0, padded))
        mine_rows = jnp.pad(mine[order], (0, padded))

        def group(g, out):
            take = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=g * rows, slice_size=rows)
            hi = jnp.max(jnp.where(take(mine_rows), take(pos_rows), 0))
            part = paged_attention_reference(
                take(q_rows), k_pages, v_pages, block_tables, take(seq_rows), take(pos_rows), scale=scale,
                sliding_window=sliding_window, soft_cap=soft_cap, alibi_slopes=alibi_slopes,
                relative_bias=relative_bias, num_blocks_to_scan=hi // block_size + 1,
                max_chunk_blocks=DECODE_CHUNK_BLOCKS)
            return jax.lax.dynamic_update_slice_in_dim(out, part, g * rows, axis=0)

        num_mine = jnp.sum(mine)
        out_rows = jax.lax.fori_loop(0, (num_mine + rows - 1) // rows, group, jnp.zeros_like(q_rows))
        return jnp.zeros_like(q_tile).at[order].set(out_rows[:tile])

    def padding_only(q_tile, seq_ids, pos, pad):
        return jnp.zeros_like(q_tile)

    def single(q_tile, seq_ids, pos, pad):
        return one_sequence(q_tile, seq_ids[jnp.argmin(pad)], pos, ~pad)

    def mixed(q_tile, seq_ids, pos, pad):
        """Tokens of several sequences. The runs that cross the tile's edges (the head or
        tail of a prompt chunk) go as matrix products when they have at least ``min_run``
        tokens; the rest (decode tokens, short prompts) gather their own keys."""
        real = ~pad
        first_seq = seq_ids[jnp.argmax(real)]
        last_seq = seq_ids[tile - 1 - jnp.argmax(real[::-1])]
        out = jnp.zeros_like(q_tile)
        rest = real
        for edge in (first_seq, last_seq):
            mine = rest & (seq_ids == edge)
            run = jnp.sum(mine)
            out = jax.lax.cond(run >= min_run,
                               lambda o, m=mine, s=edge: jnp.where(m[:, None, None], one_sequence(q_tile, s, pos, m), o),
                               lambda o: o, out)
            rest = rest & ~((seq_ids == edge) & (run >= min_run))
        return jnp.where(rest[:, None, None], per_token(q_tile, seq_ids, pos, rest), out)

    def one_tile(xs):
        q_tile, seq_ids, pos, pad = xs
        first = seq_ids[jnp.argmin(pad)]
        kind = jnp.where(jnp.all(pad), _PADDING_ONLY,
                         jnp.where(jnp.all(pad | (seq_ids == first)), _ONE_SEQUENCE, _MIXED))
        return jax.lax.switch(kind, (padding_only, single, mixed), q_tile, seq_ids, pos, pad)

    out = jax.lax.map(one_tile, (q.reshape(num_tiles, tile, num_heads, head_dim),
                                 token_seq_ids.reshape(num_tiles, tile),
                                 positions.reshape(num_tiles, tile),
                                 is_padding.reshape(num_tiles, tile)))
    return out.reshape(num_tiles * tile, num_heads, head_dim)[:num_tokens]


def packed_attention(q: Float[ArrayLike, "tokens heads head_dim"], k: Float[ArrayLike, "tokens kv_heads head_dim"],
                     v: Float[ArrayLike, "tokens kv_heads head_dim"], token_seq_ids: Int32[ArrayLike, "tokens"],
                     positions: Int32[ArrayLike, "tokens"], is_padding: Bool[ArrayLike, "tokens"], *, scale: float,
                     causal: bool, sliding_window=None, soft_cap=None,
                     alibi_slopes: Float[ArrayLike, "heads"] | None = None, relative_bias=None,
                     query_tile: int = PACKED_QUERY_TILE) -> Float[Array, "tokens heads head_dim"]:
    """Attention among a step's own tokens, with no cache: each token sees the non-padding
    tokens of its own sequence, all of them (``causal=False``: an encoder) or those at its
    position and before (``causal=True``: a training forward over a padded batch), under
    the same masks, soft cap and biases as the paged paths (``online_softmax_update``).
    q [T, H, D], k, v [T, K, D], token_seq_ids / positions [T] int32, is_padding [T] bool.
    Queries go in tiles of ``query_tile`` so the scores take [tile, H, T] at a time; the
    tile count is static, so reverse-mode autodiff goes through (the paged paths' loops
    have run-time trip counts). Returns [T, H, D] in q's dtype."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    tile = min(query_tile, num_tokens)
    num_tiles = -(-num_tokens // tile)
    extra = num_tiles * tile - num_tokens
    q_tiles = jnp.pad(q, ((0, extra), (0, 0), (0, 0))).reshape(num_tiles, tile, num_heads, head_dim)
    seq_tiles = jnp.pad(token_seq_ids, (0, extra), constant_values=-1).reshape(num_tiles, tile)
    pos_tiles = jnp.pad(positions, (0, extra)).reshape(num_tiles, tile)
    keys, values = k.astype(jnp.float32), v.astype(jnp.float32)
    slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32).reshape(num_kv_heads, group)

    def one_tile(xs):
        q_tile, seq_ids, pos = xs
        qg = q_tile.astype(jnp.float32).reshape(tile, num_kv_heads, group, head_dim) * scale
        s = jnp.einsum("tkgd,jkd->tkgj", qg, keys)
        visible = (seq_ids[:, None] == token_seq_ids[None, :]) & ~is_padding[None, :]
        rel = jnp.where(visible, positions[None, :] - pos[:, None], NOT_VISIBLE)
        _, l, acc = online_softmax_update(
            online_softmax_init(tile, num_kv_heads, group, head_dim), s, rel,
            lambda p: jnp.einsum("tkgj,jkd->tkgd", p, values), sliding_window=sliding_window,
            soft_cap=soft_cap, slopes=slopes, relative_bias=relative_bias, causal=causal)
        out = acc / jnp.maximum(l, 1e-30)[..., None]
        return out.reshape(tile, num_heads, head_dim).astype(q.dtype)

    out = jax.lax.map(one_tile, (q_tiles, seq_tiles, pos_tiles))
    return out.reshape(num_tiles * tile, num_heads, head_dim)[:num_tokens]


def packed_bidirectional_attention(q, k, v, token_seq_ids, positions, is_padding, *, scale: float,
                                   relative_bias=None, query_tile: int = PACKED_QUERY_TILE):
    """The encoder's case of :func:`packed_attention` (``causal=False``)."""
    return packed_attention(q, k, v, token_seq_ids, positions, is_padding, scale=scale, causal=False,
                            relative_bias=relative_bias, query_tile=query_tile)

"""The XLA paged attention the engine runs where there are no Pallas kernels (the CPU):
same semantics as :mod:`pallas_kernels.reference` (which stays the oracle), with a cost
that follows the tokens in context instead of the block-table width (max_model_len).

* Decode: each query gathers its own sequence's keys, a few blocks at a time, for as
  many chunks as the longest live sequence needs (a run-time trip count).
* Prefill / mixed steps: queries go in tiles of ``query_tile`` tokens. A tile whose
  tokens all belong to one sequence (every tile of a long prompt) attends to that
  sequence's keys as real matrix products, key chunk by key chunk, only over the key
  range its positions can see (causal and sliding-window limits, so a prompt costs
  about half the full square). A tile mixing sequences (decode tokens beside a prompt,
  a boundary between prompts) falls back to per-token gathers bounded by its own
  longest context. Tiles of padding only are skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.reference import (
    NOT_VISIBLE, online_softmax_init, online_softmax_update, paged_attention_reference)

# Measured on a 2-core CPU with SmolLM2-135M (benchmarks/cpu_path.py): 128-token query
# tiles against 256-token key chunks keep the products large enough for the CPU's
# matmul kernels while wasting at most one chunk per tile past the causal edge.
QUERY_TILE = 128
KEY_CHUNK_BLOCKS = 16
# Decode queries gather their keys per token: small chunks keep that bounded by the
# live context (128 tokens of waste at most per sequence).
DECODE_CHUNK_BLOCKS = 8

_PADDING_ONLY, _ONE_SEQUENCE, _MIXED = 0, 1, 2


def paged_decode_attention_xla(q, k_pages, v_pages, block_tables, seq_lens, *, scale: float,
                               sliding_window=None, soft_cap=None, alibi_slopes=None, relative_bias=None,
                               num_seqs: int | None = None, chunk_blocks: int = DECODE_CHUNK_BLOCKS):
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


def paged_attention_xla(q, k_pages, v_pages, block_tables, token_seq_ids, positions, *,
                        scale: float, sliding_window=None, soft_cap=None, alibi_slopes=None,
                        relative_bias=None, is_padding=None, query_tile: int = QUERY_TILE,
                        key_chunk_blocks: int = KEY_CHUNK_BLOCKS):
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
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(num_kv_heads, group)
    big = jnp.iinfo(jnp.int32).max

    def one_sequence(q_tile, seq_ids, pos, pad):
        """Every real token of the tile belongs to sequence seq_ids[first real token]."""
        seq = seq_ids[jnp.argmin(pad)]
        table = tables[seq]
        hi = jnp.max(jnp.where(pad, 0, pos))
        lo = 0
        if sliding_window is not None:
            lo = jnp.maximum(jnp.min(jnp.where(pad, big, pos)) - sliding_window + 1, 0)
        qg = q_tile.astype(jnp.float32).reshape(tile, num_kv_heads, group, head_dim) * scale

        def body(c, carry):
            blocks = jax.lax.dynamic_slice_in_dim(table, c * chunk_blocks, chunk_blocks)
            k = k_pages[:, blocks].astype(jnp.float32).reshape(num_kv_heads, chunk_len, head_dim)
            v = v_pages[:, blocks].astype(jnp.float32).reshape(num_kv_heads, chunk_len, head_dim)
            s = jnp.einsum("tkgd,kjd->tkgj", qg, k)  # [t, K, G, chunk]
            rel = (c * chunk_len + jnp.arange(chunk_len))[None, :] - pos[:, None]  # [t, chunk]
            return online_softmax_update(carry, s, rel, lambda p: jnp.einsum("tkgj,kjd->tkgd", p, v),
                                         sliding_window=sliding_window, soft_cap=soft_cap,
                                         slopes=slopes if alibi_slopes is not None else None,
                                         relative_bias=relative_bias)

        init = online_softmax_init(tile, num_kv_heads, group, head_dim)
        _, l, acc = jax.lax.fori_loop(lo // chunk_len, hi // chunk_len + 1, body, init)
        out = acc / jnp.maximum(l, 1e-30)[..., None]
        return out.reshape(tile, num_heads, head_dim).astype(q.dtype)

    def mixed(q_tile, seq_ids, pos, pad):
        """Tokens of several sequences: each gathers its own keys (the reference rule),
        up to the tile's longest context."""
        hi = jnp.max(jnp.where(pad, 0, pos))
        return paged_attention_reference(
            q_tile, k_pages, v_pages, block_tables, seq_ids, pos, scale=scale,
            sliding_window=sliding_window, soft_cap=soft_cap, alibi_slopes=alibi_slopes,
            relative_bias=relative_bias, num_blocks_to_scan=hi // block_size + 1, max_chunk_blocks=DECODE_CHUNK_BLOCKS)

    def padding_only(q_tile, seq_ids, pos, pad):
        return jnp.zeros_like(q_tile)

    def one_tile(xs):
        q_tile, seq_ids, pos, pad = xs
        first = seq_ids[jnp.argmin(pad)]
        kind = jnp.where(jnp.all(pad), _PADDING_ONLY,
                         jnp.where(jnp.all(pad | (seq_ids == first)), _ONE_SEQUENCE, _MIXED))
        return jax.lax.switch(kind, (padding_only, one_sequence, mixed), q_tile, seq_ids, pos, pad)

    out = jax.lax.map(one_tile, (q.reshape(num_tiles, tile, num_heads, head_dim),
                                 token_seq_ids.reshape(num_tiles, tile),
                                 positions.reshape(num_tiles, tile),
                                 is_padding.reshape(num_tiles, tile)))
    return out.reshape(num_tiles * tile, num_heads, head_dim)[:num_tokens]


def packed_attention(q, k, v, token_seq_ids, positions, is_padding, *, scale: float, causal: bool,
                     sliding_window=None, soft_cap=None, alibi_slopes=None, relative_bias=None,
                     query_tile: int = QUERY_TILE):
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
                                   relative_bias=None, query_tile: int = QUERY_TILE):
    """The encoder's case of :func:`packed_attention` (``causal=False``)."""
    return packed_attention(q, k, v, token_seq_ids, positions, is_padding, scale=scale, causal=False,
                            relative_bias=relative_bias, query_tile=query_tile)

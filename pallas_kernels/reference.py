"""Plain-XLA reference implementations of the paged-attention kernels.

These define the semantics every Pallas kernel must match (and the tiled
`attention_backend=xla` path the CPU runs, pallas_kernels/xla_attention.py, which is
built from them).

Layouts (shared by all backends):
  k_pages, v_pages : [num_kv_heads, num_blocks, block_size, head_dim]
                     block 0 is reserved as a trash block for padding tokens.
  block_tables     : [num_seqs, max_blocks_per_seq] int32, padded with 0.
  q                : [num_tokens, num_heads, head_dim]
  token_seq_ids    : [num_tokens] int32, the row of block_tables each token uses.
  positions        : [num_tokens] int32, absolute position of each query token; a
                     token attends to keys at positions
                     (positions - sliding_window, positions] of its sequence.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jaxtyping import Array, ArrayLike, Float, Int32

from pallas_kernels.array_types import KVPages, pytree_dataclass

# Large negative instead of -inf so fully masked rows never produce NaN.
MASK_VALUE = -1e30
# Upper bound (in elements) of one gathered key chunk in the XLA path.
_GATHER_BUDGET = 1 << 24
# rel at or above this marks a key a non-causal (encoder) query cannot see (another
# sequence's token, padding).
NOT_VISIBLE = 1 << 30


@pytree_dataclass
@dataclasses.dataclass
class RelativeBias:
    """T5's relative position bias: a learned scalar per head and bucket of the relative
    position (key position - query position), added to the attention scores. Buckets
    are exact up to num_buckets / 2 (per direction when bidirectional), then
    logarithmic up to max_distance."""

    table: Float[Array, "heads buckets"]
    num_buckets: int = dataclasses.field(metadata=dict(static=True))
    max_distance: int = dataclasses.field(metadata=dict(static=True))
    bidirectional: bool = dataclasses.field(metadata=dict(static=True))

    def buckets(self, rel):
        """rel (int32, key - query) -> bucket ids, as transformers' T5Attention._relative_position_bucket."""
        num_buckets = self.num_buckets
        buckets = jnp.zeros(rel.shape, jnp.int32)
        if self.bidirectional:
            num_buckets //= 2
            buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
            distance = jnp.abs(rel)
        else:
            distance = -jnp.minimum(rel, 0)
        max_exact = num_buckets // 2
        is_small = distance < max_exact
        large = max_exact + (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                             / math.log(self.max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
        large = jnp.minimum(large, num_buckets - 1)
        return buckets + jnp.where(is_small, distance, large)

    def bias(self, rel, num_kv_heads: int, group: int):
        """rel [T, J] -> float32 bias [T, K, G, J] (heads grouped as the scores are)."""
        table = rearrange(self.table.astype(jnp.float32), "(k g) n -> k g n", k=num_kv_heads)
        return rearrange(jnp.take(table, self.buckets(rel), axis=2), "k g t j -> t k g j")


def shuffled_block_tables(rng: np.random.Generator, lens, *, block_size: int, max_blocks: int,
                          free_blocks) -> np.ndarray:
    """Block tables [len(lens), max_blocks] handing out ``free_blocks`` in a random order
    (non-contiguous, as a long-running cache looks): for kernel tests and benchmarks."""
    free = rng.permutation(np.asarray(free_blocks))
    tables = np.zeros((len(lens), max_blocks), np.int32)
    i = 0
    for s, n in enumerate(lens):
        nb = -(-int(n) // block_size)
        if i + nb > len(free):
            raise ValueError(f"{len(free)} free blocks cannot hold sequences of lengths {list(lens)}")
        tables[s, :nb] = free[i:i + nb]
        i += nb
    return tables


def write_kv_pages(k_pages: KVPages, v_pages: KVPages, k_new: Float[ArrayLike, "tokens kv_heads head_dim"],
                   v_new: Float[ArrayLike, "tokens kv_heads head_dim"], slot_mapping: Int32[ArrayLike, "tokens"]
                   ) -> tuple[KVPages, KVPages]:
    """Scatter new keys/values into their pages.

    k_new, v_new: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens]
    int32 flat slots (block * block_size + offset). Padding tokens point into the
    trash block 0. Returns the updated (k_pages, v_pages); donate them to update in place.
    """
    block_size = k_pages.shape[2]

    def write(pages, new):  # slot s = block s // block_size, offset s % block_size
        flat = rearrange(pages, "k n b d -> k (n b) d").at[:, slot_mapping].set(
            rearrange(new, "t k d -> k t d").astype(pages.dtype))
        return rearrange(flat, "k (n b) d -> k n b d", b=block_size)

    return write(k_pages, k_new), write(v_pages, v_new)


def paged_attention_reference(
    q: Float[ArrayLike, "tokens heads head_dim"],
    k_pages: KVPages,
    v_pages: KVPages,
    block_tables: Int32[ArrayLike, "seqs max_blocks"],
    token_seq_ids: Int32[ArrayLike, "tokens"],
    positions: Int32[ArrayLike, "tokens"],
    *,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    alibi_slopes: Float[ArrayLike, "heads"] | None = None,
    num_blocks_to_scan=None,
    max_chunk_blocks: int | None = None,
    relative_bias=None,
    gather_rows: int | None = None,
) -> Float[Array, "tokens heads head_dim"]:
    """Attention of each query token over its sequence's paged keys (causal).

    Covers decode (one token per sequence), chunked prefill and mixed batches with
    one rule. Keys are streamed in chunks of blocks with an online softmax so memory
    stays bounded; `num_blocks_to_scan` (traced int32 scalar, optional) stops the
    loop after the longest sequence's last block; `max_chunk_blocks` (static, optional)
    caps the blocks gathered per chunk, so that with `num_blocks_to_scan` the keys read
    follow the live context rather than the table width.
    ``relative_bias``: T5's learned bias per (head, relative-position bucket), see
    :class:`RelativeBias`. ``gather_rows`` (static, optional): the query rows the
    gather budget is sized for (default: all of them), so that the chunking, and with it
    the summation order, can follow a batch's sequences rather than its queries.
    Returns [num_tokens, num_heads, head_dim] in q's dtype.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, block_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]

    per_block = (gather_rows or num_tokens) * block_size * num_kv_heads * head_dim
    chunk = int(max(1, min(max_blocks, _GATHER_BUDGET // max(per_block, 1))))
    if max_chunk_blocks is not None:
        chunk = min(chunk, int(max_chunk_blocks))
    num_chunks_static = math.ceil(max_blocks / chunk)
    # Pad the tables to a whole number of chunks (padding points at trash block 0,
    # which the position mask hides).
    pad = num_chunks_static * chunk - max_blocks
    tables = block_tables[token_seq_ids]  # [T, W]
    if pad:
        tables = jnp.pad(tables, ((0, 0), (0, pad)))

    # Query head h reads KV head h // group: the heads grouped by the KV head they share.
    qg = rearrange(q.astype(jnp.float32), "t (k g) d -> t k g d", k=num_kv_heads) * scale
    if alibi_slopes is not None:
        slopes = rearrange(jnp.asarray(alibi_slopes, jnp.float32), "(k g) -> k g", k=num_kv_heads)

    def body(c, carry):
        blocks = jax.lax.dynamic_slice_in_dim(tables, c * chunk, chunk, axis=1)  # [T, C]
        # Each token's chunk of blocks, gathered as one run of keys: [K, T, C, BS, D] -> [K, T, C*BS, D].
        k = rearrange(k_pages[:, blocks].astype(jnp.float32), "k t c b d -> k t (c b) d")
        v = rearrange(v_pages[:, blocks].astype(jnp.float32), "k t c b d -> k t (c b) d")
        s = jnp.einsum("tkgd,ktjd->tkgj", qg, k)  # [T, K, G, C*BS]
        key_pos = c * chunk * block_size + jnp.arange(chunk * block_size)
        rel = key_pos[None, :] - positions[:, None]  # [T, C*BS], <= 0 is visible
        return online_softmax_update(carry, s, rel, lambda p: jnp.einsum("tkgj,ktjd->tkgd", p, v),
                                     sliding_window=sliding_window, soft_cap=soft_cap,
                                     slopes=slopes if alibi_slopes is not None else None,
                                     relative_bias=relative_bias)

    init = online_softmax_init(num_tokens, num_kv_heads, group, head_dim)
    if num_blocks_to_scan is None:
        num_chunks = num_chunks_static
    else:
        num_chunks = jnp.minimum((num_blocks_to_scan + chunk - 1) // chunk, num_chunks_static)
    _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    return rearrange(out, "t k g d -> t (k g) d").astype(q.dtype)


def online_softmax_init(num_tokens: int, num_kv_heads: int, group: int, head_dim: int, *,
                        heads_first: bool = False):
    """(running max, running sum, accumulator) before any key: [T,K,G], [T,K,G], [T,K,G,D]
    ([K,G,T], [K,G,T], [K,G,T,D] with ``heads_first``)."""
    shape = (num_kv_heads, group, num_tokens) if heads_first else (num_tokens, num_kv_heads, group)
    return (jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))


def online_softmax_update(carry, s, rel, weighted_values, *, sliding_window=None, soft_cap=None, slopes=None,
                          relative_bias=None, causal: bool = True, heads_first: bool = False,
                          masked: bool = True):
    """One chunk of keys folded into the running softmax. s [T,K,G,J] float32 scores,
    rel [T,J] key position minus query position (<= 0 visible), ``weighted_values(p)``
    -> [T,K,G,D] (p [T,K,G,J]); slopes [K,G] for ALiBi; ``relative_bias`` (T5) a
    :class:`RelativeBias`. Masking, soft cap, ALiBi and relative biases are applied
    here, so every XLA path computes them the same way. ``causal=False`` (an encoder):
    ``rel`` only feeds the bias, the caller masks through ``rel`` = a large value.
    ``heads_first``: s is [K,G,T,J] and the carry and ``weighted_values`` are laid out
    [K,G,T(,D)] (the CPU's tiled path: its products are then plain batched matmuls).
    ``masked=False``: the caller knows every key of the chunk is visible to every query."""
    m, l, acc = carry

    def per_query_key(x):  # [T,J] -> broadcast against s
        return x[None, None] if heads_first else x[:, None, None, :]

    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    if slopes is not None:
        heads = slopes[:, :, None, None] if heads_first else slopes[None, :, :, None]
        s = s + heads * per_query_key(rel.astype(jnp.float32))
    if relative_bias is not None:
        num_kv_heads, group = (s.shape[0], s.shape[1]) if heads_first else (s.shape[1], s.shape[2])
        bias = relative_bias.bias(rel, num_kv_heads, group)  # [T,K,G,J]
        s = s + (jnp.transpose(bias, (1, 2, 0, 3)) if heads_first else bias)
    if masked:
        mask = rel <= 0 if causal else rel < NOT_VISIBLE
        if sliding_window is not None:
            mask = mask & (rel > -sliding_window)
        mask = per_query_key(mask)
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if masked:  # a query whose keys so far are all masked has m_new = MASK_VALUE: exp(0) = 1
        p = jnp.where(mask, p, 0.0)
    correction = jnp.exp(m - m_new)
    return m_new, l * correction + p.sum(axis=-1), acc * correction[..., None] + weighted_values(p)


def paged_decode_attention_reference(
    q: Float[ArrayLike, "queries heads head_dim"], k_pages: KVPages, v_pages: KVPages,
    block_tables: Int32[ArrayLike, "queries max_blocks"], seq_lens: Int32[ArrayLike, "queries"], *, scale: float,
    sliding_window=None, soft_cap=None, alibi_slopes: Float[ArrayLike, "heads"] | None = None, relative_bias=None,
) -> Float[Array, "queries heads head_dim"]:
    """Decode special case: q [num_seqs, num_heads, head_dim], one query per sequence
    at position seq_lens - 1 (seq_lens counts the token being decoded)."""
    num_seqs = q.shape[0]
    return paged_attention_reference(
        q, k_pages, v_pages, block_tables,
        token_seq_ids=jnp.arange(num_seqs, dtype=jnp.int32),
        positions=seq_lens - 1,
        scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
        alibi_slopes=alibi_slopes, relative_bias=relative_bias,
        num_blocks_to_scan=(jnp.max(seq_lens) + k_pages.shape[2] - 1) // k_pages.shape[2],
    )

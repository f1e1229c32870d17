"""Attention metadata (an explicit pytree argument of the step, never a global) and
the dispatch from the model's attention layer to a kernel backend."""

from __future__ import annotations

import dataclasses

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

import pallas_kernels
from pallas_kernels import reference


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Where each token of a step sits in the paged cache.

    T = token bucket, S = sequence bucket, W = max blocks per sequence.
    Padding tokens write into trash block 0; their outputs are never read.
    """

    positions: jax.Array       # [T] int32 absolute position of each token
    slot_mapping: jax.Array    # [T] int32 flat KV slot written by each token
    token_seq_ids: jax.Array   # [T] int32 row of block_tables for each token
    block_tables: jax.Array    # [S, W] int32
    seq_lens: jax.Array        # [S] int32 context length after this step (0 for padding)
    logits_indices: jax.Array  # [S] int32 token index whose logits each sequence samples from
    # Static: every sequence has exactly one new token at position seq_len - 1 and
    # tokens are ordered like sequences (T == S). Selects the decode kernel.
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))
    backend: str = dataclasses.field(default="xla", metadata=dict(static=True))
    # With tensor parallelism, attention runs per shard (its heads) under shard_map.
    mesh: Mesh | None = dataclasses.field(default=None, metadata=dict(static=True))


def paged_attention(q, k_pages, v_pages, md: AttentionMetadata, *, scale: float,
                    sliding_window=None, soft_cap=None, alibi_slopes=None):
    """q [T, H, D] against the paged cache (which already holds this step's keys)."""
    kwargs = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if md.mesh is None or md.mesh.shape["tp"] == 1:
        return _paged_attention_local(q, k_pages, v_pages, md, alibi_slopes=alibi_slopes, **kwargs)
    # Heads are split over "tp"; each device attends its own heads to its own KV heads.
    heads, rep = P(None, "tp", None), P()
    md_specs = jax.tree_util.tree_map(lambda _: rep, md)
    fn = functools.partial(_paged_attention_local, **kwargs)
    if alibi_slopes is None:
        return jax.shard_map(lambda q, k, v, m: fn(q, k, v, m), mesh=md.mesh,
                             in_specs=(heads, P("tp"), P("tp"), md_specs), out_specs=heads,
                             check_vma=False)(q, k_pages, v_pages, md)
    return jax.shard_map(lambda q, k, v, m, a: fn(q, k, v, m, alibi_slopes=a), mesh=md.mesh,
                         in_specs=(heads, P("tp"), P("tp"), md_specs, P("tp")), out_specs=heads,
                         check_vma=False)(q, k_pages, v_pages, md, alibi_slopes)


def _paged_attention_local(q, k_pages, v_pages, md: AttentionMetadata, *, scale: float,
                           sliding_window=None, soft_cap=None, alibi_slopes=None):
    kwargs = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  alibi_slopes=alibi_slopes)
    block_size = k_pages.shape[2]
    if md.backend == "xla":
        if md.decode_only:
            return reference.paged_decode_attention_reference(
                q, k_pages, v_pages, md.block_tables, md.seq_lens, **kwargs)
        num_blocks = (jnp.max(md.seq_lens) + block_size - 1) // block_size
        return reference.paged_attention_reference(
            q, k_pages, v_pages, md.block_tables, md.token_seq_ids, md.positions,
            num_blocks_to_scan=num_blocks, **kwargs)
    if md.decode_only:
        return pallas_kernels.paged_decode_attention(
            q, k_pages, v_pages, md.block_tables, md.seq_lens, backend=md.backend, **kwargs)
    return pallas_kernels.paged_attention(
        q, k_pages, v_pages, md.block_tables, md.token_seq_ids, md.positions,
        backend=md.backend, **kwargs)


def write_kv(k_pages, v_pages, k_new, v_new, md: AttentionMetadata):
    return reference.write_kv_pages(k_pages, v_pages, k_new, v_new, md.slot_mapping)

"""The dispatch from the model's attention layer to a paged-attention kernel backend,
per tensor-parallel shard when the model sits on a mesh."""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, ArrayLike, Float

import pallas_kernels
from pallas_kernels import reference, xla_attention
from pallas_kernels.array_types import KVPages

from ..parallel import TP_AXIS
from .step_metadata import StepMetadata


def paged_attention(q: Float[Array, "tokens heads head_dim"], k_pages: KVPages, v_pages: KVPages, md: StepMetadata, *,
                    mesh: Mesh | None, scale: float, sliding_window=None, soft_cap=None,
                    alibi_slopes: Float[ArrayLike, "heads"] | None = None, relative_bias=None) -> Float[Array, "tokens heads head_dim"]:
    """q [T, H, D] against the paged cache (which already holds this step's keys).
    With ``mesh`` (tensor parallelism), each device attends its own heads to its own KV
    heads under shard_map. ``relative_bias``: T5's (reference.RelativeBias; one device)."""
    kwargs = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if mesh is None or mesh.shape[TP_AXIS] == 1:
        return _paged_attention_local(q, k_pages, v_pages, md, alibi_slopes=alibi_slopes,
                                      relative_bias=relative_bias, **kwargs)
    if relative_bias is not None:  # the engine refuses T5 with TP > 1 before it gets here
        raise NotImplementedError("relative position biases (T5) under tensor parallelism")
    heads, rep = P(None, TP_AXIS, None), P()
    md_specs = jax.tree_util.tree_map(lambda _: rep, md)
    fn = functools.partial(_paged_attention_local, **kwargs)
    if alibi_slopes is None:
        return jax.shard_map(lambda q, k, v, m: fn(q, k, v, m), mesh=mesh,
                             in_specs=(heads, P(TP_AXIS), P(TP_AXIS), md_specs), out_specs=heads,
                             check_vma=False)(q, k_pages, v_pages, md)
    return jax.shard_map(lambda q, k, v, m, a: fn(q, k, v, m, alibi_slopes=a), mesh=mesh,
                         in_specs=(heads, P(TP_AXIS), P(TP_AXIS), md_specs, P(TP_AXIS)), out_specs=heads,
                         check_vma=False)(q, k_pages, v_pages, md, alibi_slopes)


def _paged_attention_local(q, k_pages, v_pages, md: StepMetadata, *, scale: float,
                           sliding_window=None, soft_cap=None, alibi_slopes=None, relative_bias=None):
    kwargs = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  alibi_slopes=alibi_slopes)
    if relative_bias is not None:  # only the XLA paths take it (the engine picks xla for T5)
        kwargs["relative_bias"] = relative_bias
    block_size = k_pages.shape[2]
    if md.decode_only:
        # Every token a decode query. A verify step's k+1 queries of a sequence are tiled
        # as a decode step of its sequences is, so each gets exactly the plain decode
        # step's result: greedy verification then accepts what plain decoding would emit.
        block_tables, seq_lens = md.decode_queries(block_size)
        decode = (xla_attention.paged_decode_attention_xla if md.backend == "xla" else
                  functools.partial(pallas_kernels.paged_decode_attention, backend=md.backend))
        return decode(q, k_pages, v_pages, block_tables, seq_lens, num_seqs=md.block_tables.shape[0], **kwargs)
    if md.backend == "xla":
        # The tiled XLA path (its cost follows the live context); the reference it
        # matches stays the kernels' oracle. Padding tokens write into trash block 0,
        # which no sequence owns.
        return xla_attention.paged_attention_xla(
            q, k_pages, v_pages, md.block_tables, md.token_seq_ids, md.positions,
            is_padding=md.slot_mapping < block_size, **kwargs)
    return pallas_kernels.paged_attention(
        q, k_pages, v_pages, md.block_tables, md.token_seq_ids, md.positions,
        backend=md.backend, **kwargs)


def write_kv(k_pages: KVPages, v_pages: KVPages, k_new: Float[Array, "tokens kv_heads head_dim"],
             v_new: Float[Array, "tokens kv_heads head_dim"], md: StepMetadata) -> tuple[KVPages, KVPages]:
    return reference.write_kv_pages(k_pages, v_pages, k_new, v_new, md.slot_mapping)


def paged_cross_attention(q: Float[Array, "tokens heads head_dim"], k_pages: KVPages, v_pages: KVPages, md: StepMetadata, *,
                          mesh: Mesh | None, scale: float) -> Float[Array, "tokens heads head_dim"]:
    """Non-causal attention of each decoder token q [T, H, D] over its sequence's encoder
    K/V, held in the cross blocks (md.cross_block_tables, md.cross_lens). It is the paged
    attention of every backend with each query placed at its encoder's last position
    (cross_lens - 1): causality then hides nothing, and the keys read stop at the
    encoder's length."""
    cross_md = dataclasses.replace(md, block_tables=md.cross_block_tables, seq_lens=md.cross_lens,
                                   positions=md.cross_lens[md.token_seq_ids] - 1)
    return paged_attention(q, k_pages, v_pages, cross_md, mesh=mesh, scale=scale)


def attention_without_cache(q: Float[Array, "tokens heads head_dim"], k: Float[Array, "tokens kv_heads head_dim"],
                            v: Float[Array, "tokens kv_heads head_dim"], md: StepMetadata, *, scale: float,
                            sliding_window=None, soft_cap=None, alibi_slopes: Float[ArrayLike, "heads"] | None = None,
                            relative_bias=None) -> Float[Array, "tokens heads head_dim"]:
    """Attention among the step's own tokens, with no cache: causal when
    ``md.dense_causal`` (a training forward over a padded batch: differentiable, with the
    layer's window, soft cap and ALiBi), else bidirectional (an encoder pass). Padding
    tokens have token_seq_ids -1: none sees them."""
    return xla_attention.packed_attention(
        q, k, v, md.token_seq_ids, md.positions, md.token_seq_ids < 0, scale=scale, causal=md.dense_causal,
        sliding_window=sliding_window, soft_cap=soft_cap, alibi_slopes=alibi_slopes, relative_bias=relative_bias)

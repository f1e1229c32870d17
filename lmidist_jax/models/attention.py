"""The dispatch from the model's attention layer to a paged-attention kernel backend,
per tensor-parallel shard when the model sits on a mesh."""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, PartitionSpec as P

import pallas_kernels
from pallas_kernels import reference, xla_attention

from ..parallel import TP_AXIS
from .step_metadata import StepMetadata


def paged_attention(q, k_pages, v_pages, md: StepMetadata, *, mesh: Mesh | None, scale: float,
                    sliding_window=None, soft_cap=None, alibi_slopes=None):
    """q [T, H, D] against the paged cache (which already holds this step's keys).
    With ``mesh`` (tensor parallelism), each device attends its own heads to its own KV
    heads under shard_map."""
    kwargs = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if mesh is None or mesh.shape[TP_AXIS] == 1:
        return _paged_attention_local(q, k_pages, v_pages, md, alibi_slopes=alibi_slopes, **kwargs)
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
                           sliding_window=None, soft_cap=None, alibi_slopes=None):
    kwargs = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  alibi_slopes=alibi_slopes)
    block_size = k_pages.shape[2]
    if md.backend == "xla":
        # The tiled XLA path (its cost follows the live context); the reference it
        # matches stays the kernels' oracle.
        if md.decode_only:
            return xla_attention.paged_decode_attention_xla(
                q, k_pages, v_pages, md.block_tables, md.seq_lens, **kwargs)
        # Padding tokens write into trash block 0, which no sequence owns.
        return xla_attention.paged_attention_xla(
            q, k_pages, v_pages, md.block_tables, md.token_seq_ids, md.positions,
            is_padding=md.slot_mapping < block_size, **kwargs)
    if md.decode_only:
        return pallas_kernels.paged_decode_attention(
            q, k_pages, v_pages, md.block_tables, md.seq_lens, backend=md.backend, **kwargs)
    return pallas_kernels.paged_attention(
        q, k_pages, v_pages, md.block_tables, md.token_seq_ids, md.positions,
        backend=md.backend, **kwargs)


def write_kv(k_pages, v_pages, k_new, v_new, md: StepMetadata):
    return reference.write_kv_pages(k_pages, v_pages, k_new, v_new, md.slot_mapping)

"""Pallas paged DECODE attention (one query token per sequence), Triton backend.

Same result as `reference.paged_decode_attention_reference`:
  q            [num_seqs, num_heads, head_dim]
  k/v_pages    [num_kv_heads, num_blocks, block_size, head_dim]   (block 0 = trash)
  block_tables [num_seqs, max_blocks] int32
  seq_lens     [num_seqs] int32 (counts the token being decoded; 0 = padding row -> zeros)

Design (see NOTES.md for the measurements):
  * grid = (num_seqs, num_kv_heads * head_splits, num_splits). One program owns one
    sequence, one KV head (all of its `group` query heads at once, padded to >= 16 rows
    so the QK^T / PV products run on the tensor cores) and one split of the sequence.
  * Split-K ("flash-decoding"): the blocks of a sequence are divided evenly among the
    `num_splits` programs *at run time* (from its actual length), so ragged batches stay
    balanced; each program writes an unnormalised partial (acc, max, sum) of its real
    rows and a second small Pallas kernel merges them. With num_splits == 1 the kernel
    normalises and writes the output directly (no combine).
  * Everything is addressed through flat element offsets computed in the kernel
    (block_id * block_size * head_dim + ...; q and the output as [num_seqs*num_heads*
    head_dim]), so any block table (shuffled, non-contiguous) and any head_dim work, and
    the wrapper adds no XLA ops (no padding copies): head_dim that is not a power of two
    and groups smaller than the 16-row MMA are padded in registers by masked loads and
    stores.
  * Only the blocks that can be visible are read: [first, cdiv(len, bs)) where `first`
    skips blocks entirely outside a sliding window.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, ArrayLike, Float, Int32

from pallas_kernels.array_types import KVPages
from pallas_kernels.reference import MASK_VALUE

try:  # Deprecated in JAX 0.11 but still functional on CUDA GPUs.
    from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover
    plt = None

BACKENDS = ("triton",)


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _cdiv(a, b):
    return lax.div(a + b - 1, b)


def default_num_splits(num_seqs: int, num_kv_heads: int, head_splits: int, max_blocks: int,
                       pages_per_block: int, target_programs: int = 1024) -> int:
    """Power-of-two split count so that the grid has >= `target_programs` programs
    (H100: 132 SMs; many programs keep ragged batches balanced), never splitting below
    two compute blocks of pages per split. Measured on H100 (NOTES.md): 32 seqs x 8 KV
    heads -> 4 splits, 1 seq x 8 KV heads x 512 blocks -> 32 splits."""
    base = max(1, num_seqs * num_kv_heads * head_splits)
    splits = 1
    while base * splits < target_programs and splits * 2 * pages_per_block <= max_blocks:
        splits *= 2
    return splits


def _row_offsets(s, kvh, hsplit, *, block_h, group, num_kv_heads, head_dim, head_dim_p):
    """Flat offsets of this program's query rows in a [num_seqs, num_heads, head_dim]
    array, and the mask of real (row < group, d < head_dim) elements. Masked offsets
    point one past the end so that a (never issued on GPU) masked store cannot alias."""
    r = lax.iota(jnp.int32, block_h)
    head = hsplit * block_h + r
    dim = lax.iota(jnp.int32, head_dim_p)
    base = ((s * num_kv_heads + kvh) * group + head) * head_dim
    mask = (head < group)[:, None] & (dim < head_dim)[None, :]
    return base[:, None] + dim[None, :], mask, head < group


def _decode_kernel(lens_ref, bt_ref, q_ref, k_ref, v_ref, *rest, scale, block_size, head_dim,
                   head_dim_p, pages, max_blocks, num_splits, sliding_window, soft_cap,
                   has_alibi, group, num_kv_heads, head_splits, block_h, precision):
    if has_alibi:
        slopes_ref, *out_refs = rest
    else:
        slopes_ref, out_refs = None, list(rest)
    s = pl.program_id(0)
    hb = pl.program_id(1)
    split = pl.program_id(2)
    kvh = lax.div(hb, head_splits)
    hsplit = lax.rem(hb, head_splits)
    block_k = pages * block_size
    out_size = q_ref.shape[0]

    length = lens_ref[s]
    n_blocks = _cdiv(length, block_size)
    if sliding_window is not None:
        lo_tok = length - sliding_window  # keys at positions >= lo_tok are visible
        first = lax.div(jnp.maximum(lo_tok, 0), block_size)
    else:
        lo_tok = None
        first = jnp.int32(0)
    span = jnp.maximum(n_blocks - first, 0)
    if num_splits > 1:
        per = _cdiv(_cdiv(span, num_splits), pages) * pages
        start = first + split * per
        end = jnp.minimum(start + per, n_blocks)
    else:
        start, end = first, n_blocks
    num_iters = _cdiv(jnp.maximum(end - start, 0), pages)
    hi_tok = jnp.minimum(length, end * block_size)  # keys at positions < hi_tok are visible

    q_offs, q_mask, row_valid = _row_offsets(
        s, kvh, hsplit, block_h=block_h, group=group, num_kv_heads=num_kv_heads,
        head_dim=head_dim, head_dim_p=head_dim_p)
    q_offs = jnp.where(q_mask, q_offs, out_size)
    q = plt_load(q_ref, q_offs, q_mask)  # [block_h, head_dim_p], zero padded
    tok = lax.iota(jnp.int32, block_k)
    dim = lax.iota(jnp.int32, head_dim_p)
    dmask = (dim < head_dim)[None, :] if head_dim_p != head_dim else None
    bt_row = s * max_blocks
    if has_alibi:
        h_idx = kvh * group + hsplit * block_h + lax.iota(jnp.int32, block_h)
        slopes = plt_load(slopes_ref, jnp.where(row_valid, h_idx, 0), row_valid)
        slopes = slopes.astype(jnp.float32)  # [block_h]

    def body(i, carry):
        acc, m, l = carry
        blk0 = start + i * pages
        offs = page_offsets(bt_ref, bt_row, blk0, end, tok, dim, block_size=block_size,
                            max_blocks=max_blocks, head_dim=head_dim)
        sc = key_scores(q, load_rows(k_ref, offs, dmask), scale, soft_cap, precision)  # [block_h, block_k]
        key_pos = blk0 * block_size + tok
        if has_alibi:
            rel = (key_pos - (length - 1)).astype(jnp.float32)
            sc = sc + slopes[:, None] * rel[None, :]
        mask = key_pos < hi_tok
        if lo_tok is not None:
            mask = mask & (key_pos >= lo_tok)
        mask = mask[None, :]
        return online_softmax_step(acc, m, l, sc, mask, load_rows(v_ref, offs, dmask), precision)

    init = (jnp.zeros((block_h, head_dim_p), jnp.float32),
            jnp.full((block_h,), MASK_VALUE, jnp.float32),
            jnp.zeros((block_h,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_iters, body, init)

    if num_splits == 1:
        (o_ref,) = out_refs
        inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)
        plt.store(o_ref.at[q_offs], (acc * inv[:, None]).astype(o_ref.dtype), mask=q_mask)
    else:  # unnormalised partials of the real rows only
        o_ref, m_ref, l_ref = out_refs
        plt.store(o_ref, acc, mask=row_valid[:, None])
        plt.store(m_ref, m, mask=row_valid)
        plt.store(l_ref, l, mask=row_valid)


def _combine_kernel(acc_ref, m_ref, l_ref, o_ref, *, group, num_kv_heads, head_splits,
                    head_dim, head_dim_p, block_h, block_d):
    """Merge the split-K partials of one (sequence, KV head, head split, head_dim chunk)."""
    s = pl.program_id(0)
    hb = pl.program_id(1)
    dc = pl.program_id(2)
    kvh = lax.div(hb, head_splits)
    hsplit = lax.rem(hb, head_splits)
    r = lax.iota(jnp.int32, block_h)
    head = hsplit * block_h + r
    row_valid = head < group
    dim = dc * block_d + lax.iota(jnp.int32, block_d)
    mask = row_valid[:, None] & (dim < head_dim)[None, :]
    offs = (((s * num_kv_heads + kvh) * group + head) * head_dim)[:, None] + dim[None, :]
    rv = row_valid[None, :]
    m = plt.load(m_ref, mask=rv, other=MASK_VALUE)  # [P, block_h]
    l = plt.load(l_ref, mask=rv, other=0.0)
    acc = plt.load(acc_ref, mask=rv[:, :, None], other=0.0)  # [P, block_h, block_d]
    m_max = jnp.max(m, axis=0)
    w = jnp.where(l > 0, jnp.exp(m - m_max[None, :]), 0.0)
    l_tot = jnp.sum(w * l, axis=0)
    o = jnp.sum(w[:, :, None] * acc, axis=0)
    inv = jnp.where(l_tot > 0, 1.0 / jnp.where(l_tot > 0, l_tot, 1.0), 0.0)
    out_size = math.prod(o_ref.shape)
    offs = jnp.where(mask, offs, out_size)
    plt.store(o_ref.at[offs], (o * inv[:, None]).astype(o_ref.dtype), mask=mask)


def check_paged_inputs(name: str, backend: str, q, k_pages, v_pages) -> None:
    """Validation shared by the decode and mixed kernels: backend, shapes, int32 offsets."""
    if backend not in BACKENDS:
        raise ValueError(f"{name}: unsupported backend {backend!r}; "
                         f"expected one of {BACKENDS}")
    _, num_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, head_dim_k = k_pages.shape
    if head_dim_k != head_dim or v_pages.shape != k_pages.shape:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k_pages.shape}, v {v_pages.shape}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if num_blocks * block_size * head_dim >= 2**31:
        raise ValueError("KV cache too large for int32 offsets within one KV head")


def page_offsets(bt_ref, bt_row, blk0, end, tok, dim, *, block_size, max_blocks, head_dim):
    """Flat offsets [block_k, head_dim_p] of the keys of logical blocks blk0.. of the
    sequence whose block table starts at bt_row; blocks at or past ``end`` read the
    trash block 0. Shared by both kernels."""
    bidx = blk0 + lax.div(tok, block_size)  # [block_k] logical block of each key
    ids = bt_ref[bt_row + jnp.minimum(bidx, max_blocks - 1)]
    ids = jnp.where(bidx < end, ids, 0)
    return ((ids * block_size + lax.rem(tok, block_size)) * head_dim)[:, None] + dim[None, :]


def load_rows(ref, offs, dmask):
    """Gather K or V rows at ``offs``; dmask (None = no padding) zeroes head_dim padding."""
    return ref[offs] if dmask is None else plt_load(ref, offs, dmask)


def key_scores(q, k, scale, soft_cap, precision):
    """Scaled (and soft-capped) q.k^T in float32: [rows, block_k]."""
    sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32) * scale
    if soft_cap is not None:
        sc = soft_cap * jnp.tanh(sc / soft_cap)
    return sc


def online_softmax_step(acc, m, l, sc, mask, v, precision):
    """One key tile of flash attention: fold scores sc [rows, keys] (masked by mask) and
    values v [keys, head_dim] into the running (acc, max, sum). Shared by both kernels."""
    sc = jnp.where(mask, sc, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(sc, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(sc - m_new[:, None]), 0.0)
    l_new = l * corr + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)
    return acc * corr[:, None] + pv, m_new, l_new


def plt_load(ref, offs, mask):
    """Masked gather load (masked elements read 0)."""
    return plt.load(ref.at[offs], mask=mask, other=0)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "sliding_window", "soft_cap", "interpret", "backend", "num_seqs",
                     "num_splits", "pages_per_compute_block", "num_warps", "num_stages",
                     "block_h", "combine_block_d"))
def paged_decode_attention(q: Float[ArrayLike, "queries heads head_dim"], k_pages: KVPages, v_pages: KVPages,
                           block_tables: Int32[ArrayLike, "queries max_blocks"], seq_lens: Int32[ArrayLike, "queries"], *,
                           scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
                           alibi_slopes: Float[ArrayLike, "heads"] | None = None, interpret: bool = False,
                           backend: str = "triton", num_seqs: int | None = None, num_splits: int | None = None,
                           pages_per_compute_block: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None,
                           block_h: int | None = None, combine_block_d: int | None = None
                           ) -> Float[Array, "queries heads head_dim"]:
    """Paged decode attention; see the module docstring. Returns [num_queries, num_heads,
    head_dim] in q's dtype.

    ``num_seqs`` (static): the sequences of the step when its queries are more (a verify
    step: each sequence's last token and its draft's proposals, one query each, with
    their own block_tables / seq_lens rows): the split-K is sized as for a decode of
    that many sequences, so that each query's result is bit for bit a plain decode's.

    Tuning (static): num_splits (split-K programs per sequence; default from
    `default_num_splits`), pages_per_compute_block (pages per inner-loop tile; default
    128 tokens), num_warps / num_stages (Triton), block_h (query-head rows per program,
    >= 16 and a power of two), combine_block_d (head_dim chunk per program of the
    split-K combine kernel).
    """
    check_paged_inputs("paged_decode_attention", backend, q, k_pages, v_pages)
    num_queries, num_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    max_blocks = block_tables.shape[1]
    head_dim_p = _next_pow2(head_dim)
    group_p = _next_pow2(group)
    if block_h is None:
        block_h = min(max(16, group_p), 64)
    block_h = max(block_h, 16)
    head_splits = max(1, group_p // block_h)
    if pages_per_compute_block is None:
        pages_per_compute_block = max(1, (128 if head_dim_p <= 128 else 64) // block_size)
    pages = pages_per_compute_block
    if num_splits is None:
        num_splits = default_num_splits(num_seqs or num_queries, num_kv_heads, head_splits, max_blocks, pages)

    if num_splits > 1:
        num_splits = _next_pow2(num_splits)  # the combine kernel loads all splits at once
    q_flat = q.reshape(-1)
    k_flat = k_pages.reshape(num_kv_heads, num_blocks * block_size * head_dim)
    v_flat = v_pages.reshape(num_kv_heads, num_blocks * block_size * head_dim)
    bt_flat = block_tables.astype(jnp.int32).reshape(-1)
    lens = seq_lens.astype(jnp.int32)

    hs = head_splits
    kv_size = num_blocks * block_size * head_dim
    in_specs = [
        pl.BlockSpec((num_queries,), lambda s, h, p: (0,)),
        pl.BlockSpec((num_queries * max_blocks,), lambda s, h, p: (0,)),
        pl.BlockSpec((q_flat.shape[0],), lambda s, h, p: (0,)),
        pl.BlockSpec((None, kv_size), lambda s, h, p: (h // hs, 0)),
        pl.BlockSpec((None, kv_size), lambda s, h, p: (h // hs, 0)),
    ]
    args = [lens, bt_flat, q_flat, k_flat, v_flat]
    has_alibi = alibi_slopes is not None
    if has_alibi:
        in_specs.append(pl.BlockSpec((num_heads,), lambda s, h, p: (0,)))
        args.append(jnp.asarray(alibi_slopes, jnp.float32).reshape(num_heads))

    out_flat = jax.ShapeDtypeStruct(q_flat.shape, q.dtype)
    if num_splits == 1:
        out_shape = [out_flat]
        out_specs = [pl.BlockSpec((q_flat.shape[0],), lambda s, h, p: (0,))]
    else:
        part = (num_queries, num_kv_heads * hs, num_splits, block_h)
        out_shape = [jax.ShapeDtypeStruct(part + (head_dim_p,), jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32)]
        out_specs = [
            pl.BlockSpec((None, None, None, block_h, head_dim_p), lambda s, h, p: (s, h, p, 0, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda s, h, p: (s, h, p, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda s, h, p: (s, h, p, 0)),
        ]

    common = dict(group=group, num_kv_heads=num_kv_heads, head_splits=hs, head_dim=head_dim,
                  head_dim_p=head_dim_p, block_h=block_h)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None  # not TF32
    kernel = functools.partial(
        _decode_kernel, scale=float(scale), block_size=block_size, pages=pages,
        max_blocks=max_blocks, num_splits=num_splits, sliding_window=sliding_window,
        soft_cap=soft_cap, has_alibi=has_alibi, precision=precision, **common)
    compiler_params = None
    if plt is not None:
        compiler_params = plt.CompilerParams(num_warps=num_warps or 4, num_stages=num_stages or 2)
    outs = pl.pallas_call(
        kernel,
        grid=(num_queries, num_kv_heads * hs, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params,
        interpret=interpret,
        name=f"paged_decode_p{pages}_s{num_splits}_h{block_h}",
    )(*args)
    if num_splits == 1:
        o = outs[0]
    else:
        if combine_block_d is None:  # keep <= 8K partial elements per program in registers
            combine_block_d = max(16, min(head_dim_p, 8192 // (num_splits * block_h)))
        bd = min(_next_pow2(combine_block_d), head_dim_p)
        o = pl.pallas_call(
            functools.partial(_combine_kernel, block_d=bd, **common),
            grid=(num_queries, num_kv_heads * hs, head_dim_p // bd),
            in_specs=[
                pl.BlockSpec((None, None, num_splits, block_h, bd),
                             lambda s, h, d: (s, h, 0, 0, d)),
                pl.BlockSpec((None, None, num_splits, block_h), lambda s, h, d: (s, h, 0, 0)),
                pl.BlockSpec((None, None, num_splits, block_h), lambda s, h, d: (s, h, 0, 0)),
            ],
            out_specs=pl.BlockSpec((q_flat.shape[0],), lambda s, h, d: (0,)),
            out_shape=out_flat,
            compiler_params=(plt.CompilerParams(num_warps=4, num_stages=1)
                             if plt is not None else None),
            interpret=interpret,
            name=f"paged_decode_combine_s{num_splits}",
        )(*outs)
    return o.reshape(num_queries, num_heads, head_dim)

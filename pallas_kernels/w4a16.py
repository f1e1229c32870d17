"""Weight-only quantized matmul (W4A16 / W8A16): activations in the model's dtype,
weights as packed integers with per-group scales and zeros (AWQ, GPTQ), or as 4-bit
indices into a per-output-channel codebook (SqueezeLLM).

One packed layout for every method (the loader repacks each checkpoint format into it
once; see NOTES.md, "Quantized weights"). P = 32 / bits values per int32 word; T =
``tile_words``, a power of two chosen per weight by :func:`tile_words_for`:

  qweight  [K / P, N] int32. Rows are cut into tiles of P*T input rows held by T words;
           within a tile, bits [b*j, b*j + b) of word r hold input row  j*T + r  (plane j
           of the tile is T consecutive input rows). T = 1 is GPTQ's own order (word r
           holds rows P*r .. P*r + P - 1).
  scales   [G, N]  group g covers input rows g*group_size .. (g+1)*group_size - 1
  zeros    [G, N]  the integer zero point of each group, as a float
  lut      [16, N] (SqueezeLLM) row i is the value of index i in column n's codebook

  w[k, n] = (q[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n]
  w[k, n] = lut[q[k, n], n]                                      (SqueezeLLM)

Why tiles: plane j of a tile multiplies the T contiguous activations x[:, j*T : j*T + T]
of the tile, so the kernel reads activations and words with plain contiguous loads (no
transpose of x per call, no gathers), and a tile never straddles a group (P*T divides the
group), so each tile has one scale row and one zero row.

Functions (x [M, K] -> [M, N] in x's dtype):
  quant_matmul_reference / lut_matmul_reference    dequantize with XLA, then one matmul
                                                   (the CPU path and the tests' oracle)
  quant_matmul_pallas(..., lut=None | codebook)    the Triton-backend Pallas kernel
  quant_matmul(..., impl)                          dispatch

The kernel (one program per ``block_n`` output columns and split of K) has two paths,
picked by M at trace time (:func:`default_config`):
  "gemv"  M <= GEMV_MAX_M: dequantize in registers and multiply-accumulate on the CUDA
          cores, per activation row, into [T, block_n] float32 accumulators that are
          reduced over rows once at the end (no padded rows, no tensor-core layout).
  "mma"   larger M (T >= 16): each plane dequantized to the activations' dtype and one
          [M_pad, T] x [T, block_n] dot per plane on the tensor cores.
Dequantization costs two arithmetic instructions per weight and no int-to-float
conversion (a quarter-rate instruction on Hopper): a value q at bit p of its word is
made the mantissa of a float with exponent 2^(23 - p) (``(word & mask) | magic``, one
LOP3: the float 2^(23 - p) + q, exact), and one subtraction of 2^(23 - p) leaves q.
Values above bit 23 are read from one shifted copy of each word (:func:`plane_positions`).
The gemv path then takes the zero point once per group and row
(s * (sum x q - z * sum x)); the mma path dequantizes (q - z) * s before the dot.
Split K (``k_splits`` > 1) adds each split's partial
sums into a zeroed float32 output with atomic adds (``reduce="atomic"``) or writes
float32 partials that XLA sums (``reduce="partials"``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, ArrayLike, Float, Int32

try:  # Deprecated in JAX 0.11 but still functional on CUDA GPUs.
    from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover
    plt = None

QUANT_MATMUL_IMPLS = ("xla", "pallas")
SUPPORTED_BITS = (4, 8)
KERNEL_PATHS = ("gemv", "mma")
REDUCTIONS = ("atomic", "partials")
# Words per tile: 16 words hold one group of 128 rows at 4 bits (the common GPTQ/AWQ group).
MAX_TILE_WORDS = 16
# Activation rows the CUDA-core path takes; above it the tensor cores (measured:
# benchmarks/quant.py, see NOTES.md).
GEMV_MAX_M = 4
_MAGIC = 0x4B000000          # float32 bits of 2^23: a value in the low 23 bits is its mantissa
_MAGIC_F = float(1 << 23)


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None  # fp32: not TF32


def _next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def _largest_pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def tile_words_for(group_rows: int, bits: int, cap: int = MAX_TILE_WORDS) -> int:
    """T of the packed layout for groups of ``group_rows`` input rows (for a per-channel
    weight: the rows one device holds): the largest power of two <= ``cap`` with P*T
    dividing the group, so no tile straddles a group; 1 (GPTQ's order, the kernel off)
    when a group is not a whole number of words."""
    pack = 32 // bits
    if group_rows <= 0 or group_rows % pack:
        return 1
    return _largest_pow2_divisor(group_rows // pack, cap)


# ---------------------------------------------------------------------------------------
# The layout and the XLA reference
# ---------------------------------------------------------------------------------------

def unpack_rows(qweight, bits: int, tile_words: int = 1):
    """[K / P, ...] int32 packed along the input -> [K, ...] int32 values in [0, 2^bits),
    rows in input order (see the module docstring for the tile order)."""
    pack = 32 // bits
    shifts = (jnp.arange(pack, dtype=jnp.int32) * bits).reshape((1, pack) + (1,) * (qweight.ndim - 1))
    values = jnp.bitwise_and(lax.shift_right_logical(qweight[:, None], shifts), (1 << bits) - 1)  # [K/P, P, ...]
    # word t*T + r, value j  ->  row t*P*T + j*T + r
    return rearrange(values, "(tile word) value ... -> (tile value word) ...", word=tile_words)


def pack_rows(values: np.ndarray, bits: int, tile_words: int = 1) -> np.ndarray:
    """numpy inverse of :func:`unpack_rows`: [K, N] values -> [K / P, N] int32."""
    pack = 32 // bits
    k, n = values.shape
    v = rearrange(values.astype(np.uint32), "(tile value word) n -> tile value word n", value=pack, word=tile_words)
    out = np.zeros((k // (pack * tile_words), tile_words, n), np.uint32)
    for j in range(pack):
        out |= v[:, j] << np.uint32(bits * j)
    return out.reshape(k // pack, n).view(np.int32)


def dequantize(qweight, scales, zeros, *, bits: int, tile_words: int = 1, dtype=jnp.float32):
    """The dense weight [K, ...] of a grouped-quantized one (computed in float32: the same
    numbers as a float32 dequantization of the checkpoint, then cast to ``dtype``)."""
    q = unpack_rows(qweight, bits, tile_words).astype(jnp.float32)
    group_size = q.shape[0] // scales.shape[0]
    s = jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)
    z = jnp.repeat(zeros.astype(jnp.float32), group_size, axis=0)
    return ((q - z) * s).astype(dtype)


def dequantize_lut(qweight, lut, *, bits: int = 4, tile_words: int = 1, dtype=jnp.float32):
    """The dense weight [K, ...] of a codebook-quantized one: w[k, n] = lut[q[k, n], n]."""
    q = unpack_rows(qweight, bits, tile_words)
    return jnp.take_along_axis(lut.astype(jnp.float32), q, axis=0).astype(dtype)


def _matmul(x, w):
    return lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())), precision=_precision(x.dtype))


def quant_matmul_reference(x: Float[ArrayLike, "rows in_features"], qweight: Int32[ArrayLike, "words *out"],
                           scales: Float[ArrayLike, "groups *out"], zeros: Float[ArrayLike, "groups *out"], *, bits: int = 4,
                           tile_words: int = 1) -> Float[Array, "rows *out"]:
    """x [M, K] @ dequantize(...) [K, ...] -> [M, ...] (XLA: dequantize, then one matmul)."""
    return _matmul(x, dequantize(qweight, scales, zeros, bits=bits, tile_words=tile_words))


def lut_matmul_reference(x: Float[ArrayLike, "rows in_features"], qweight: Int32[ArrayLike, "words *out"],
                         lut: Float[ArrayLike, "codes *out"], *, bits: int = 4, tile_words: int = 1
                         ) -> Float[Array, "rows *out"]:
    """x [M, K] @ dequantize_lut(...) [K, ...] -> [M, ...]."""
    return _matmul(x, dequantize_lut(qweight, lut, bits=bits, tile_words=tile_words))


# ---------------------------------------------------------------------------------------
# Pallas (Triton backend)
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How one call is cut into programs (see the module docstring)."""
    path: str = "gemv"        # gemv | mma
    block_n: int = 64         # output columns per program
    tiles_per_step: int = 2   # tiles loaded per loop step (independent loads in flight)
    k_splits: int = 1         # programs along K per column block
    reduce: str = "atomic"    # how split-K partial sums meet: atomic | partials
    num_warps: int = 4
    num_stages: int = 3

    def check(self, m: int, k_words: int, n: int, tile_words: int) -> None:
        tiles = k_words // tile_words
        problems = []
        if self.path not in KERNEL_PATHS:
            problems.append(f"path={self.path!r} (accepted: {', '.join(KERNEL_PATHS)})")
        if self.reduce not in REDUCTIONS:
            problems.append(f"reduce={self.reduce!r} (accepted: {', '.join(REDUCTIONS)})")
        if n % self.block_n or self.block_n & (self.block_n - 1):
            problems.append(f"block_n={self.block_n} must be a power of two dividing N={n}")
        if tiles % (self.k_splits * self.tiles_per_step):
            problems.append(f"k_splits x tiles_per_step = {self.k_splits} x {self.tiles_per_step} must divide the "
                            f"{tiles} tiles of {tile_words} words")
        if self.path == "mma" and tile_words < 16:
            problems.append(f"path=mma needs tiles of >= 16 words (a tensor-core dot's K); these have {tile_words}")
        if problems:
            raise ValueError("quant_matmul_pallas: " + "; ".join(problems))


def kernel_supports(m: int, n: int, tile_words: int) -> bool:
    """Whether the kernel takes an [M, K] x [K, N] product in a layout of ``tile_words``
    (else the caller dequantizes and runs one XLA matmul): tiles that hold whole groups
    (T > 1), >= 16 output columns a program, and the tensor-core path's K >= 16 above
    GEMV_MAX_M rows."""
    return tile_words > 1 and _largest_pow2_divisor(n, 64) >= 16 and (m <= GEMV_MAX_M or tile_words >= 16)


def default_config(m: int, k_words: int, n: int, tile_words: int, num_sms: int = 132) -> KernelConfig:
    """The configuration measured best on an H100 (benchmarks/quant.py sweep, NOTES.md):
    gemv: 32 columns, four tiles a step and no split K when that gives >= 512 programs
    (gate/up), else 64 columns and K split until >= ~3 programs per SM; mma: 64 columns
    (a cheaper operand layout than 128), K split until >= ~2 programs per SM."""
    tiles = k_words // tile_words
    path = "gemv" if m <= GEMV_MAX_M or tile_words < 16 else "mma"
    if path == "gemv" and n % 32 == 0 and n // 32 >= 4 * num_sms and tiles % 4 == 0:
        return KernelConfig(path=path, block_n=32, tiles_per_step=4, k_splits=1, num_warps=4, num_stages=3)
    block_n = _largest_pow2_divisor(n, 64)
    per_step = _largest_pow2_divisor(tiles, 2)
    want = (384 if path == "gemv" else 256) * num_sms // 132
    splits = 1
    while (n // block_n) * splits < want and tiles % (splits * 2 * per_step) == 0 \
            and tiles // (splits * 2) >= 2 * per_step:
        splits *= 2
    # Split K summed by XLA (a reduction that also casts) measured faster than atomic adds
    # into a zeroed output (a memset, the kernel and a cast): H100, 0-24% per call.
    return KernelConfig(path=path, block_n=block_n, tiles_per_step=per_step, k_splits=splits, reduce="partials",
                        num_warps=4, num_stages=3 if path == "gemv" else 2)


def plane_positions(bits: int) -> list[tuple[bool, int]]:
    """Where plane j's value sits for the magic-float trick: (from the word shifted right
    by :func:`_high_shift`?, bit position p). A value is read as a float's mantissa, so it
    must end at or below bit 23: planes whose natural position ``bits*j`` fits are read
    from the word itself, the others from one shifted copy per word."""
    shift = _high_shift(bits)
    out = []
    for j in range(32 // bits):
        p = bits * j
        out.append((False, p) if p + bits <= 23 else (True, p - shift))
    return out


def _high_shift(bits: int) -> int:
    return -(-(32 - 23) // bits) * bits  # 12 at 4 bits, 16 at 8 bits


def magic_words(bits: int) -> np.ndarray:
    """[P] int32: per plane, the float32 bits of 2^(23 - p): OR-ed over a value at bit p,
    they make the float 2^(23 - p) + q exactly."""
    return np.array([(127 + 23 - p) << 23 for _, p in plane_positions(bits)], np.int32)


def _select_tree(src, shift: int, bits: int, table):
    """lut[q] for q = the ``bits`` bits of ``src`` at ``shift``: a tree of selects on the
    bits (``table``: 2^bits rows of [1, block_n])."""
    level = list(table)
    for b in range(bits):
        bit = (src & (1 << (shift + b))) != 0
        level = [jnp.where(bit, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _quant_kernel(x_ref, q_ref, a_ref, b_ref, magic_ref, *refs, bits, tile_words, group_tiles, m,
                  cfg: KernelConfig, tiles_per_split, lut, out_dtype, precision):
    o_ref = refs[-1]
    pack = 32 // bits
    mask = (1 << bits) - 1
    positions = plane_positions(bits)
    t_words = tile_words
    bn = cfg.block_n
    j_n = pl.program_id(0)
    split = pl.program_id(1)
    cols = pl.ds(pl.multiple_of(j_n * bn, bn), bn)
    gemv = cfg.path == "gemv"
    # Loaded, not constants: ``(v & mask) | magic`` is then one LOP3 (two immediates are not).
    magics = [magic_ref[j] for j in range(pack)]
    if lut:  # the 2^bits codebook rows of these columns, loaded once
        table = [a_ref[pl.ds(i, 1), cols].astype(jnp.float32) for i in range(1 << bits)]

    def load(t):
        """Tile t's words [T, bn] int32 and (grouped) its scale and zero rows [1, bn]."""
        words = q_ref[pl.ds(pl.multiple_of(t * t_words, t_words), t_words), cols]
        if lut:
            return (words,)
        g = t // group_tiles
        return words, a_ref[pl.ds(g, 1), cols], b_ref[pl.ds(g, 1), cols]

    def tile(t, loaded, accs):
        """Multiply-accumulate tile t (P*T input rows, one group's) into ``accs``."""
        words = loaded[0]
        high = lax.shift_right_logical(words, _high_shift(bits))
        row0 = t * (pack * t_words)
        if not lut:
            scale = loaded[1].astype(jnp.float32)                                       # [1, bn]
            zero = loaded[2].astype(jnp.float32)
            if not gemv:
                zero_scale = zero * scale                                               # (q - z) s = q s - z s
        if gemv:
            group_accs = [None] * m
            x_sums = [None] * m
        for j, (shifted, p) in enumerate(positions):
            src = high if shifted else words
            xcols = pl.ds(pl.multiple_of(row0 + j * t_words, t_words), t_words)
            if lut:
                w = _select_tree(src, p, bits, table)                                   # [T, bn]
            else:
                # 2^(23-p) + q exactly; minus 2^(23-p): q as a float (no int-to-float instruction)
                f = lax.bitcast_convert_type((src & (mask << p)) | magics[j], jnp.float32)
                w = f - float(1 << (23 - p))
            if gemv:
                for r in range(m):
                    xj = x_ref[r, xcols].astype(jnp.float32)                            # [T]
                    term = w * xj[:, None]
                    if lut:
                        accs[r] = accs[r] + term
                    else:
                        group_accs[r] = term if group_accs[r] is None else group_accs[r] + term
                        x_sums[r] = xj if x_sums[r] is None else x_sums[r] + xj
            else:
                xj = x_ref[:, xcols]                                                    # [M_pad, T]
                wj = w if lut else w * scale - zero_scale
                accs[0] = accs[0] + lax.dot_general(xj, wj.astype(xj.dtype), (((1,), (0,)), ((), ())),
                                                    precision=precision, preferred_element_type=jnp.float32)
        if gemv and not lut:
            # sum_j x_j (q_j - z) s = s (sum_j x_j q_j - z sum_j x_j): the zero point once per group
            for r in range(m):
                accs[r] = accs[r] + scale * (group_accs[r] - zero * x_sums[r][:, None])
        return accs

    steps = tiles_per_split // cfg.tiles_per_step

    def first_tile(s):
        return split * tiles_per_split + s * cfg.tiles_per_step

    def step(s, accs):
        first = first_tile(s)
        accs = list(accs)
        for u in range(cfg.tiles_per_step):
            accs = tile(first + u, load(first + u), accs)
        return tuple(accs)

    if gemv:
        init = tuple(jnp.zeros((t_words, bn), jnp.float32) for _ in range(m))
    else:
        init = (jnp.zeros((x_ref.shape[0], bn), jnp.float32),)
    accs = lax.fori_loop(0, steps, step, init)
    if gemv:
        rows = [jnp.sum(a, axis=0, keepdims=True) for a in accs]                        # [1, bn] each
    else:
        rows = [accs[0]]                                                                # [M_pad, bn]
    for r, value in enumerate(rows):
        rsel = pl.ds(r, 1) if gemv else pl.ds(0, x_ref.shape[0])
        if cfg.k_splits == 1:
            o_ref[rsel, cols] = value.astype(out_dtype)
        elif cfg.reduce == "atomic":
            plt.atomic_add(o_ref, (rsel, cols), value)
        else:
            o_ref[split, rsel, cols] = value


@functools.partial(jax.jit, static_argnames=("bits", "tile_words", "config", "interpret"))
def quant_matmul_pallas(x: Float[ArrayLike, "rows in_features"], qweight: Int32[ArrayLike, "words out"],
                        scales: Float[ArrayLike, "groups out"] | None = None, zeros: Float[ArrayLike, "groups out"] | None = None,
                        lut: Float[ArrayLike, "codes out"] | None = None, *, bits: int = 4, tile_words: int = 1,
                        config: KernelConfig | None = None, interpret: bool = False) -> Float[Array, "rows out"]:
    """x [M, K] @ the packed weight [K / P, N] -> [M, N] in x's dtype; grouped scales and
    zeros, or a codebook ``lut`` [16, N]. ``config``: None = :func:`default_config`."""
    m, k = x.shape
    k_words, n = qweight.shape
    pack = 32 // bits
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quant_matmul_pallas: bits={bits}; supported: {SUPPORTED_BITS}")
    if k_words * pack != k:
        raise ValueError(f"quant_matmul_pallas: x has {k} inputs, qweight {qweight.shape} holds "
                         f"{k_words * pack} at {bits} bits")
    if k_words % tile_words:
        raise ValueError(f"quant_matmul_pallas: tile_words={tile_words} does not divide the {k_words} packed rows")
    use_lut = lut is not None
    cfg = config or default_config(m, k_words, n, tile_words)
    cfg.check(m, k_words, n, tile_words)
    tiles = k_words // tile_words
    if use_lut:
        a, b, group_tiles = lut, jnp.zeros((1, 1), jnp.float32), tiles
    else:
        num_groups = scales.shape[0]
        group_rows = k // num_groups
        if k % num_groups or group_rows % (pack * tile_words):
            raise ValueError(f"quant_matmul_pallas: {num_groups} groups of {k} rows do not hold whole tiles of "
                             f"{pack * tile_words} rows (tile_words={tile_words})")
        a, b, group_tiles = scales, zeros, group_rows // (pack * tile_words)
    if cfg.path == "mma":
        m_pad = max(16, _next_pow2(m))  # the smallest tensor-core dot has 16 rows
        if m_pad != m:
            x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
        rows_out = m_pad
    else:
        rows_out = m
    kernel = functools.partial(
        _quant_kernel, bits=bits, tile_words=tile_words, group_tiles=group_tiles, m=m, cfg=cfg,
        tiles_per_split=tiles // cfg.k_splits, lut=use_lut, out_dtype=x.dtype, precision=_precision(x.dtype))
    grid = (n // cfg.block_n, cfg.k_splits)
    params = plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages) if plt else None
    name = f"w{bits}a16{'_lut' if use_lut else ''}_{cfg.path}_n{cfg.block_n}_t{tile_words}x{cfg.tiles_per_step}" \
           f"_s{cfg.k_splits}"
    operands = (x, qweight, a, b, jnp.asarray(magic_words(bits)))
    if cfg.k_splits == 1:
        out = pl.pallas_call(kernel, grid=grid, out_shape=jax.ShapeDtypeStruct((rows_out, n), x.dtype),
                             compiler_params=params, interpret=interpret, name=name)(*operands)
    elif cfg.reduce == "atomic":
        zeros_out = jnp.zeros((rows_out, n), jnp.float32)
        out = pl.pallas_call(kernel, grid=grid, out_shape=jax.ShapeDtypeStruct((rows_out, n), jnp.float32),
                             input_output_aliases={5: 0}, compiler_params=params, interpret=interpret,
                             name=name)(*operands, zeros_out)
        out = out.astype(x.dtype)
    else:
        out = pl.pallas_call(kernel, grid=grid,
                             out_shape=jax.ShapeDtypeStruct((cfg.k_splits, rows_out, n), jnp.float32),
                             compiler_params=params, interpret=interpret, name=name)(*operands)
        out = jnp.sum(out, axis=0).astype(x.dtype)
    return out[:m] if rows_out != m else out


def quant_matmul(x: Float[ArrayLike, "rows in_features"], qweight: Int32[ArrayLike, "words *out"],
                 scales: Float[ArrayLike, "groups *out"] | None = None, zeros: Float[ArrayLike, "groups *out"] | None = None,
                 lut: Float[ArrayLike, "codes *out"] | None = None, *, bits: int = 4, tile_words: int = 1,
                 impl: str = "xla", interpret: bool = False) -> Float[Array, "rows *out"]:
    """x [M, K] @ the packed weight [K / P, N] -> [M, N]; ``impl`` "xla" or "pallas"."""
    if impl == "xla":
        if lut is not None:
            return lut_matmul_reference(x, qweight, lut, bits=bits, tile_words=tile_words)
        return quant_matmul_reference(x, qweight, scales, zeros, bits=bits, tile_words=tile_words)
    if impl == "pallas":
        return quant_matmul_pallas(x, qweight, scales, zeros, lut, bits=bits, tile_words=tile_words,
                                   interpret=interpret)
    raise ValueError(f"unknown quantized-matmul implementation {impl!r}; expected one of "
                     f"{', '.join(QUANT_MATMUL_IMPLS)}")

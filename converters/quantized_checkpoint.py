"""Pre-quantized checkpoint formats (AWQ, GPTQ, SqueezeLLM) read into the one packed
layout of ``pallas_kernels/w4a16.py``, once at load (numpy; never per call).

Formats as the tools write them (per quantized linear ``<name>``):

  AWQ "GEMM"  qweight [in, out/8] int32 packed along the output in the nibble order
              0,2,4,6,1,3,5,7; qzeros [groups, out/8] packed the same way; scales
              [groups, out]. w = (q - z) * s.
  GPTQ        qweight [in/P, out] int32 packed along the input (P = 32 / bits); qzeros
              [groups, out/P] packed along the output, stored as zero - 1 for
              ``checkpoint_format: gptq`` (undone as gptqmodel does: one add of 0x11111111
              per packed word, carries included), as is for ``gptq_v2``; scales
              [groups, out]; g_idx [in] (input row -> group; with desc_act the groups are
              scattered: rows are sorted by group once here, and the permutation is applied
              to the activations).
  SqueezeLLM  qweight [in/8, out] (4-bit codebook indices packed along the input) and
              lookup_table [out, 16]; ``quant_config.json`` {"wbits": 4}; the state dict
              may be ``*.pt`` or ``pytorch_model*.bin``.

``convert_module`` takes a quantization config by duck typing (``method``, ``bits``,
``pack``, ``group_size``, ``act_order``, ``checkpoint_format`` and ``tile_words(in)``:
``lmidist_jax.models.quantized.QuantConfig``), so this layer imports nothing above it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pallas_kernels.w4a16 import pack_rows

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8
LEAVES = ("qweight", "qzeros", "scales", "g_idx", "lookup_table")
QUANT_NAME = re.compile(r"(.+)\.(" + "|".join(LEAVES) + r")$")


class QuantizationError(ValueError):
    """A quantized checkpoint that cannot be served as configured (the message names the
    value and what is accepted)."""


def _mask(bits: int) -> int:
    return (1 << bits) - 1


def unpack_cols(packed: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """[R, C / P] int32 packed along the columns -> [R, C] values. Value i (bits
    [b*i, b*i + b)) of word c is column c*P + order[i] (order: identity if None)."""
    pack = 32 // bits
    words = packed.astype(np.int32).view(np.uint32)
    values = (words[:, :, None] >> (bits * np.arange(pack, dtype=np.uint32))) & _mask(bits)
    if order is not None:
        out = np.empty_like(values)
        out[:, :, list(order)] = values
        values = out
    return values.reshape(packed.shape[0], -1).astype(np.int32)


def unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """[R / P, C] int32 packed along the rows in GPTQ's order -> [R, C] values (row P*r + j
    in value j)."""
    return np.ascontiguousarray(unpack_cols(packed.T, bits).T)


def required_leaves(config) -> tuple[str, ...]:
    if config.method == "squeezellm":
        return ("qweight", "lookup_table")
    if config.method == "gptq" and config.act_order:
        return ("qweight", "qzeros", "scales", "g_idx")
    return ("qweight", "qzeros", "scales")


def _shape_error(module: str, leaf: str, got, want) -> QuantizationError:
    return QuantizationError(f"{module}.{leaf} has shape {tuple(got)}; expected {tuple(want)}")


def convert_module(module: str, tensors: dict, config) -> dict:
    """One quantized linear's checkpoint tensors -> our arrays: qweight [in/P, out] in the
    kernel's tile order (``config.tile_words(in)``), scales / zeros [groups, out] (or lut
    [16, out]), and perm [in] for act-order."""
    bits, pack = config.bits, config.pack
    q = np.asarray(tensors["qweight"])
    if q.dtype not in (np.int32, np.uint32):
        raise QuantizationError(f"{module}.qweight has dtype {q.dtype}; expected int32")
    if config.method == "squeezellm":
        lut = np.asarray(tensors["lookup_table"])
        rows, out = q.shape
        if lut.shape != (out, 1 << bits):
            raise _shape_error(module, "lookup_table", lut.shape, (out, 1 << bits))
        tile = config.tile_words(rows * pack)
        qweight = q.view(np.int32) if tile == 1 else pack_rows(unpack_rows(q, bits), bits, tile)
        return {"qweight": qweight, "lut": np.ascontiguousarray(lut.T)}
    scales = np.asarray(tensors["scales"])
    if config.method == "awq":
        in_features, out = q.shape[0], q.shape[1] * pack
        values = unpack_cols(q, bits, AWQ_ORDER)                      # [in, out]
        zeros = unpack_cols(np.asarray(tensors["qzeros"]), bits, AWQ_ORDER)
    else:
        in_features, out = q.shape[0] * pack, q.shape[1]
        values = None
        qzeros = np.asarray(tensors["qzeros"]).astype(np.int32).view(np.uint32)
        if config.checkpoint_format == "gptq":
            # Stored as zero - 1 by a subtraction on the packed word: undo it the same way.
            qzeros = qzeros + np.uint32(sum(1 << (bits * j) for j in range(pack)))
        zeros = unpack_cols(qzeros.view(np.int32), bits)
    group = in_features if config.group_size == -1 else config.group_size
    groups = in_features // group
    if scales.shape != (groups, out):
        raise _shape_error(module, "scales", scales.shape, (groups, out))
    if zeros.shape != (groups, out):
        raise _shape_error(module, "qzeros", np.asarray(tensors["qzeros"]).shape, (groups, out // pack))
    result = {"scales": scales, "zeros": zeros.astype(np.float32)}
    g_idx = tensors.get("g_idx")
    in_order = np.arange(in_features) // group
    perm = None
    if g_idx is not None:
        g_idx = np.asarray(g_idx).astype(np.int64)
        if g_idx.shape != (in_features,):
            raise _shape_error(module, "g_idx", g_idx.shape, (in_features,))
        if not np.array_equal(g_idx, in_order):
            if not config.act_order:
                check_in_order(module, g_idx, in_features, config)
            if g_idx.min() < 0 or g_idx.max() >= groups or np.any(np.bincount(g_idx, minlength=groups) != group):
                raise QuantizationError(f"{module}.g_idx does not give each of the {groups} groups {group} rows")
            perm = np.argsort(g_idx, kind="stable")
    tile = config.tile_words(in_features)
    if perm is not None or tile != 1 or values is not None:
        values = unpack_rows(q, bits) if values is None else values
        if perm is not None:
            values = values[perm]
        result["qweight"] = pack_rows(values, bits, tile)
    else:
        result["qweight"] = q.view(np.int32)
    if config.act_order:
        result["perm"] = (np.arange(in_features) if perm is None else perm).astype(np.int32)
    return result


def check_in_order(module: str, g_idx: np.ndarray, in_features: int, config) -> None:
    group = in_features if config.group_size == -1 else config.group_size
    if not np.array_equal(g_idx.astype(np.int64), np.arange(in_features) // group):
        raise QuantizationError(f"{module}.g_idx scatters the groups but the checkpoint says desc_act=false")


def checkpoint_tensors(model_dir, load_format: str, config, progress: bool = True):
    """The checkpoint's tensors; a SqueezeLLM state dict may also be a ``*.pt`` file."""
    from .checkpoint import ModelLoadError, _iter_pt, iter_checkpoint_tensors

    try:
        return iter_checkpoint_tensors(model_dir, load_format, progress=progress)
    except ModelLoadError:
        pt = sorted(Path(model_dir).glob("*.pt"))
        if config is None or config.method != "squeezellm" or not pt or load_format not in ("auto", "pt"):
            raise
        return _iter_pt(pt, progress)

"""GGUF (llama.cpp) -> Hugging Face checkpoint directory, with numpy only (no torch).

Handles llama-architecture files (llama.cpp also writes Mistral and other llama-likes
as ``llama``): the tensors are dequantized with ``gguf.quants.dequantize``, renamed to
the HF Llama names, and the rotary row permutation that llama.cpp's converter applies
to the Q and K projections is undone. The tokenizer is rebuilt from the GGUF metadata
with transformers' GGUF tokenizer converter (which needs no torch).

Also handles ``gemma3`` files (-> ``Gemma3ForCausalLM``): llama.cpp stores every Gemma 3
RMSNorm weight as ``w + 1`` (HF's Gemma3RMSNorm multiplies by ``1 + w``), so 1 is
subtracted again; Q/K are not permuted for Gemma. Its SentencePiece-BPE vocabulary is
rebuilt as an HF BPE tokenizer whose merges follow the GGUF scores, which tokenizes the
way llama.cpp's SPM tokenizer does.

The output directory holds ``config.json``, ``generation_config.json``,
``model.safetensors`` (float32; sharded with an index when large), ``tokenizer.json``,
``tokenizer_config.json`` and the chat template. It is written into a temporary sibling
directory and renamed into place, so a crash never leaves a half-converted directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
DEFAULT_MAX_SHARD_BYTES = 4 << 30

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Gemma 3 (gguf-py's TensorNameMap for MODEL_ARCH.GEMMA3): four norms per layer plus Q/K norms.
_GEMMA3_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# llama.cpp's convert_hf_to_gguf.py (Gemma3Model.norm_shift) adds 1.0 to every tensor whose
# HF name ends in "norm.weight"; HF's Gemma3RMSNorm computes x * (1 + weight).
GEMMA3_NORM_SHIFT = 1.0
# llama.cpp's defaults for gemma3 files that do not carry these keys (llama-model.cpp).
_GEMMA3_SLIDING_WINDOW_PATTERN = 6
_GEMMA3_ROPE_LOCAL_BASE = 10000.0
# Tensors llama.cpp stores but the HF checkpoint does not (recomputed by the model).
_SKIPPED_TENSORS = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# Pre-tokenizer regexes for byte-level BPE vocabularies, by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted (unsupported architecture/type, bad shapes)."""


# ---------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------

def _read_metadata(reader) -> dict[str, Any]:
    """All key/value fields as Python values (strings, numbers, lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # pragma: no cover - exotic value types we don't need
            logger.debug("skipping unreadable GGUF field %s", key)
    return meta


class _GGUFTensor:
    """A tensor of a GGUF file: what the converter uses of ``gguf.ReaderTensor``."""

    __slots__ = ("name", "tensor_type", "shape", "data")

    def __init__(self, name: str, tensor_type: int, shape: np.ndarray, data: np.ndarray | None):
        self.name = name
        self.tensor_type = tensor_type
        self.shape = shape  # ggml order (fastest-varying first), like ReaderTensor.shape
        self.data = data  # raw bytes (uint8, one row per ggml row); None for an unknown type


# GGUF value types (gguf.GGUFValueType) -> numpy dtypes (little-endian files).
_GGUF_NUMPY = {0: np.uint8, 1: np.int8, 2: np.dtype("<u2"), 3: np.dtype("<i2"), 4: np.dtype("<u4"),
               5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.bool_, 10: np.dtype("<u8"),
               11: np.dtype("<i8"), 12: np.dtype("<f8")}
_GGUF_STRUCT = {t: struct.Struct("<" + c) for t, c in
                {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}.items()}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _HeaderCursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, vtype: int):
        fmt = _GGUF_STRUCT[vtype]
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def u32(self) -> int:
        return self.scalar(4)

    def u64(self) -> int:
        return self.scalar(10)

    def string(self) -> str:
        n = self.u64()
        start, self.pos = self.pos, self.pos + n
        return self.buf[start:self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _GGUF_STRING:
            return self.string()
        if vtype != _GGUF_ARRAY:
            return self.scalar(vtype)
        item_type, count = self.u32(), self.u64()
        if item_type == _GGUF_STRING:
            return [self.string() for _ in range(count)]
        if item_type == _GGUF_ARRAY:
            return [self.value(_GGUF_ARRAY) for _ in range(count)]
        dtype = np.dtype(_GGUF_NUMPY[item_type])
        values = np.frombuffer(self.buf, dtype, count, self.pos)
        self.pos += dtype.itemsize * count
        return values.tolist()


def _read_gguf_fast(path: Path) -> tuple[dict[str, Any], list[_GGUFTensor]] | None:
    """Metadata and tensors of a little-endian GGUF v2/v3 file, read straight from a memory map.

    ``gguf.GGUFReader`` builds a numpy view per metadata array element, which takes ~45 s on
    a 262k-token vocabulary; this takes well under a second. Returns None for files it does
    not handle (big-endian, GGUF v1), which then go through GGUFReader.
    """
    import mmap

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _HeaderCursor(buf)
    if bytes(buf[:4]) != b"GGUF":
        raise GGUFConversionError(f"{path} is not a GGUF file")
    cur.pos = 4
    version = cur.u32()
    if version not in (2, 3):  # v1 (32-bit counts) or a byte-swapped (big-endian) file
        return None
    n_tensors, n_kv = cur.u64(), cur.u64()
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.u32())
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.u64() for _ in range(cur.u32())]
        infos.append((name, dims, cur.u32(), cur.u64()))
    alignment = int(meta.get("general.alignment", 32))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, dims, ttype, offset in infos:
        shape = np.array(dims, dtype=np.uint64)
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            tensors.append(_GGUFTensor(name, ttype, shape, None))
            continue
        row = int(dims[0]) if dims else 1
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        row_bytes = row // block * type_size
        start = data_start + offset
        if start + rows * row_bytes > len(buf):
            raise GGUFConversionError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        data = np.frombuffer(buf, np.uint8, rows * row_bytes, start).reshape(rows, row_bytes)
        tensors.append(_GGUFTensor(name, ttype, shape, data))
    return meta, tensors


def _read_gguf(path: Path) -> tuple[dict[str, Any], list]:
    """(metadata, tensors) of a GGUF file; tensors have name, tensor_type, shape and data."""
    try:
        fast = _read_gguf_fast(path)
    except (struct.error, ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
        if isinstance(e, GGUFConversionError):
            raise
        raise GGUFConversionError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    if fast is not None:
        return fast
    import gguf

    reader = gguf.GGUFReader(str(path))
    return _read_metadata(reader), list(reader.tensors)


def _f32(value) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def _required(meta: dict, key: str, path: Path):
    if key not in meta:
        raise GGUFConversionError(f"{path}: GGUF metadata key {key!r} is missing")
    return meta[key]


def _llama3_rope_scaling(rope_freqs: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recovers transformers' llama3 rope_scaling from llama.cpp's `rope_freqs` tensor.

    llama.cpp bakes the llama3 frequency factors into a tensor instead of metadata; we
    try the published parameter sets and keep the one that reproduces it exactly.
    """
    rope_freqs = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    factor = float(rope_freqs.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096), (1.0, 4.0, 16384), (1.0, 4.0, 131072)):
        low_wavelen, high_wavelen = orig / low, orig / high
        smooth = (orig / wavelen - low) / (high - low)
        expected = np.where(wavelen < high_wavelen, 1.0,
                            np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if expected.shape == rope_freqs.shape and np.allclose(expected, rope_freqs, rtol=1e-3, atol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise GGUFConversionError(
        "the GGUF file has a rope_freqs tensor (llama3-style rope scaling) whose values match "
        "no known llama3 rope_scaling parameters; cannot write an equivalent HF config")


@dataclasses.dataclass(frozen=True)
class _ConfigFamily:
    """How one GGUF architecture's HF config differs from the others; ``_build_config``
    writes the keys they share. Defaults are what llama.cpp assumes when a key is missing."""

    architecture: str  # HF ``architectures``
    model_type: str
    activation: tuple[str, str]  # (transformers' key for it in this model type, value)
    rms_norm_eps: float
    context_length: int
    head_dim: int | None  # without attention.key_length; None: rope.dimension_count, else hidden / heads
    # (meta, "arch.", the shared keys, tensor names, path) -> the family's own keys; refuses
    # what the family cannot express.
    own_keys: Callable[[dict, str, dict, set[str], Path], dict]


def _build_config(meta: dict, tensor_names: set[str], path: Path) -> dict:
    """An HF config dict (``config.json``) from a GGUF file's metadata."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConversionError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    family = _CONFIG_FAMILIES[arch]
    p = f"{arch}."
    hidden = int(_required(meta, p + "embedding_length", path))
    heads = int(_required(meta, p + "attention.head_count", path))
    head_dim = family.head_dim or meta.get(p + "rope.dimension_count", hidden // heads)
    activation_key, activation = family.activation
    config: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_required(meta, p + "feed_forward_length", path)),
        "num_hidden_layers": int(_required(meta, p + "block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", heads)),
        "head_dim": int(meta.get(p + "attention.key_length", head_dim)),
        activation_key: activation,
        "rms_norm_eps": _f32(meta.get(p + "attention.layer_norm_rms_epsilon", family.rms_norm_eps)),
        "max_position_embeddings": int(meta.get(p + "context_length", family.context_length)),
        "vocab_size": _vocab_size(meta, p),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    config.update(family.own_keys(meta, p, config, tensor_names, path))
    config["torch_dtype"] = "float32"
    _add_special_token_ids(config, meta)
    return config


def _vocab_size(meta: dict, prefix: str) -> int | None:
    vocab = meta.get(prefix + "vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else None
    return int(vocab) if vocab is not None else None


def _add_special_token_ids(config: dict, meta: dict) -> None:
    for key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[hf_key] = int(token_id)


def _llama_keys(meta: dict, p: str, config: dict, tensor_names: set[str], path: Path) -> dict:
    """Llama: one rope base (+ ``rope_scaling``), biases where the tensors have them."""
    head_dim = config["head_dim"]
    if meta.get(p + "rope.dimension_count", head_dim) != head_dim:
        raise GGUFConversionError(f"{path}: partial rotary embeddings "
                                  f"(rope.dimension_count={meta[p + 'rope.dimension_count']} != head_dim={head_dim}) "
                                  "are not supported for llama")
    if meta.get(p + "expert_count"):
        raise GGUFConversionError(f"{path}: mixture-of-experts llama GGUF files are not supported")
    keys: dict[str, Any] = {
        "rope_theta": _f32(meta.get(p + "rope.freq_base", 10000.0)),
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
    }
    scaling_type = meta.get(p + "rope.scaling.type")
    if scaling_type not in (None, "none"):
        scaling: dict[str, Any] = {"rope_type": scaling_type, "factor": float(meta.get(p + "rope.scaling.factor", 1.0))}
        orig = meta.get(p + "rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = int(orig)
        keys["rope_scaling"] = scaling
    return keys


def _gemma3_layer_types(meta: dict, n_layers: int, sliding_window: int | None, path: Path) -> list[str]:
    """Which layers use sliding-window attention, as llama.cpp decides it for gemma3."""
    pattern = meta.get("gemma3.attention.sliding_window_pattern")
    if not sliding_window:
        return ["full_attention"] * n_layers
    if isinstance(pattern, list):  # one bool per layer: True = sliding window
        if len(pattern) != n_layers:
            raise GGUFConversionError(f"{path}: gemma3.attention.sliding_window_pattern has {len(pattern)} "
                                      f"entries for {n_layers} layers")
        return ["sliding_attention" if swa else "full_attention" for swa in pattern]
    # An int n: every n-th layer is global (llama.cpp: set_swa_pattern(n), default 6).
    n = int(pattern) if pattern is not None else _GEMMA3_SLIDING_WINDOW_PATTERN
    if n <= 0:
        raise GGUFConversionError(f"{path}: bad gemma3.attention.sliding_window_pattern {pattern!r}")
    return ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(n_layers)]


def _gemma3_keys(meta: dict, p: str, config: dict, tensor_names: set[str], path: Path) -> dict:
    """Gemma 3 (``Gemma3TextConfig``): sliding/global layers, a rope base per layer type,
    the query scale and softcaps, in the layout transformers 5 writes (``layer_types``,
    ``rope_parameters`` per layer type).

    Keys the GGUF file lacks take the values llama.cpp itself assumes for gemma3
    (llama-model.cpp): a sliding-window pattern of 6, a local rope base of 10000 and
    attention scaled by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B).
    """
    head_dim, n_layers = config["head_dim"], config["num_hidden_layers"]
    if int(meta.get(p + "attention.value_length", head_dim)) != head_dim:
        raise GGUFConversionError(f"{path}: gemma3 with value_length != key_length is not supported")
    if int(meta.get(p + "rope.dimension_count", head_dim)) != head_dim:
        raise GGUFConversionError(f"{path}: partial rotary embeddings are not supported for gemma3")
    if any(name.endswith(".bias") for name in tensor_names):
        raise GGUFConversionError(f"{path}: gemma3 GGUF files with bias tensors are not supported")
    sliding_window = meta.get(p + "attention.sliding_window")
    sliding_window = int(sliding_window) if sliding_window else None

    scale = meta.get(p + "attention.scale")
    if scale:  # llama.cpp multiplies the queries by this scale: HF by query_pre_attn_scalar ** -0.5
        query_pre_attn_scalar = round(1.0 / float(scale) ** 2, 4)
        if query_pre_attn_scalar == int(query_pre_attn_scalar):
            query_pre_attn_scalar = int(query_pre_attn_scalar)
    elif n_layers == 62:  # Gemma 3 27B (llama.cpp: LLM_TYPE_27B)
        query_pre_attn_scalar = config["hidden_size"] // config["num_attention_heads"]
    else:
        query_pre_attn_scalar = head_dim

    full_rope: dict[str, Any] = {"rope_theta": _f32(meta.get(p + "rope.freq_base", 1_000_000.0)),
                                 "rope_type": "default"}
    scaling_type = meta.get(p + "rope.scaling.type")
    if scaling_type not in (None, "none"):  # Gemma 3 4B+: linear scaling of the global layers
        if scaling_type != "linear":
            raise GGUFConversionError(f"{path}: gemma3 rope scaling {scaling_type!r} is not supported")
        full_rope.update(rope_type="linear", factor=_f32(meta.get(p + "rope.scaling.factor", 1.0)))
    sliding_rope = {"rope_theta": _f32(meta.get(p + "rope.freq_base_swa", _GEMMA3_ROPE_LOCAL_BASE)),
                    "rope_type": "default"}

    def softcap(key: str) -> float | None:
        value = meta.get(p + key)
        return _f32(value) if value else None

    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "sliding_window": sliding_window,
        "layer_types": _gemma3_layer_types(meta, n_layers, sliding_window, path),
        "rope_parameters": {"full_attention": full_rope, "sliding_attention": sliding_rope},
        "final_logit_softcapping": softcap("final_logit_softcapping"),
        "attn_logit_softcapping": softcap("attn_logit_softcapping"),
        "use_bidirectional_attention": False,
    }


_CONFIG_FAMILIES = {
    "llama": _ConfigFamily("LlamaForCausalLM", "llama", ("hidden_act", "silu"), rms_norm_eps=1e-5,
                           context_length=2048, head_dim=None, own_keys=_llama_keys),
    "gemma3": _ConfigFamily("Gemma3ForCausalLM", "gemma3_text", ("hidden_activation", "gelu_pytorch_tanh"),
                            rms_norm_eps=1e-6, context_length=131072, head_dim=256, own_keys=_gemma3_keys),
}


# ---------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------

def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    layer_tensors = _GEMMA3_LAYER_TENSORS if arch == "gemma3" else _LAYER_TENSORS
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in layer_tensors:
        return f"model.layers.{m.group(1)}.{layer_tensors[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` (rows of Q/K weights, or Q/K biases).

    llama.cpp: ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)``,
    i.e. HF's half-split rotary layout -> interleaved pairs. Undo: view the rows as
    (n_head, rows // n_head // 2, 2) and swap the last two back.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFConversionError(f"cannot un-permute {rows} rows over {n_head} heads")
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape))


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (HF layout -> GGUF layout); used by tests."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape))


def _dequantize(tensor) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        qtype = GGMLQuantizationType(int(tensor.tensor_type))
    except ValueError:
        raise GGUFConversionError(f"tensor {tensor.name!r} has unknown GGML type {int(tensor.tensor_type)}") from None
    if qtype.name not in SUPPORTED_TENSOR_TYPES:
        raise GGUFConversionError(f"tensor {tensor.name!r} has type {qtype.name}, not one of "
                                  f"{', '.join(SUPPORTED_TENSOR_TYPES)}")
    # GGUF lists dims fastest-first (ggml ne[]); numpy wants them slowest-first.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    array = np.asarray(dequantize(np.asarray(tensor.data), qtype), dtype=np.float32)
    if array.size != int(np.prod(shape)):
        raise GGUFConversionError(f"tensor {tensor.name!r}: {array.size} values for shape {shape}")
    return array.reshape(shape)


def _expected_shapes(config: dict, o_bias: bool) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the converted Llama or Gemma 3 directory must hold, with its shape."""
    gemma3 = config["model_type"] == "gemma3_text"
    h, i = config["hidden_size"], config["intermediate_size"]
    d = config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    for n in range(config["num_hidden_layers"]):
        pre = f"model.layers.{n}."
        shapes.update({
            pre + "self_attn.q_proj.weight": (q, h), pre + "self_attn.k_proj.weight": (kv, h),
            pre + "self_attn.v_proj.weight": (kv, h), pre + "self_attn.o_proj.weight": (h, q),
            pre + "mlp.gate_proj.weight": (i, h), pre + "mlp.up_proj.weight": (i, h),
            pre + "mlp.down_proj.weight": (h, i),
            pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
        })
        if gemma3:  # q/k norms and the sandwich norms around the MLP
            shapes.update({pre + "self_attn.q_norm.weight": (d,), pre + "self_attn.k_norm.weight": (d,),
                           pre + "pre_feedforward_layernorm.weight": (h,),
                           pre + "post_feedforward_layernorm.weight": (h,)})
        if config.get("attention_bias"):
            shapes.update({pre + "self_attn.q_proj.bias": (q,), pre + "self_attn.k_proj.bias": (kv,),
                           pre + "self_attn.v_proj.bias": (kv,)})
            if o_bias:
                shapes[pre + "self_attn.o_proj.bias"] = (h,)
        if config.get("mlp_bias"):
            shapes.update({pre + "mlp.gate_proj.bias": (i,), pre + "mlp.up_proj.bias": (i,),
                           pre + "mlp.down_proj.bias": (h,)})
    return shapes


def _iter_hf_tensors(tensors, config: dict, path: Path, progress: bool) -> Iterator[tuple[str, np.ndarray]]:
    from tqdm.auto import tqdm

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    gemma3 = config["model_type"] == "gemma3_text"
    arch, family = ("gemma3", "Gemma3") if gemma3 else ("llama", "Llama")
    for tensor in tqdm(tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        if tensor.name in _SKIPPED_TENSORS:
            continue
        name = _hf_name(tensor.name, arch)
        if name is None:
            raise GGUFConversionError(f"{path}: GGUF tensor {tensor.name!r} has no HF {family} counterpart")
        array = _dequantize(tensor)
        if gemma3:
            # llama.cpp keeps Gemma's Q/K rows in HF order (its permute is LlamaModel-only),
            # but stores every RMSNorm weight w as w + 1.
            if name.endswith("norm.weight"):
                array = array - np.float32(GEMMA3_NORM_SHIFT)
        elif ".self_attn.q_proj." in name:
            array = unpermute_rotary(array, heads)
        elif ".self_attn.k_proj." in name:
            array = unpermute_rotary(array, kv_heads)
        yield name, array


# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------

def _byte_level_pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":  # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: single digits, then GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    if pre not in (None, "default", "gpt2", "gpt-2"):
        logger.warning("GGUF pre-tokenizer %r is not known to lmidist-jax; using the GPT-2 split", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# llama.cpp token types (gguf.TokenType).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4


def _spm_bpe_backend(meta: dict):
    """A `tokenizers` BPE model equivalent to llama.cpp's SPM tokenizer on a SentencePiece-BPE
    vocabulary without a space prefix (Gemma's), built from tokens, scores and token types.

    llama.cpp (llm_tokenizer_spm) first splits out user-defined and control tokens, replaces
    spaces with "▁", then repeatedly merges the adjacent pair whose concatenation is the
    highest-scoring token, and spells leftover characters as <0xXX> byte tokens. HF's BPE does
    the same when the merges are every (left, right) split of each normal token, ranked by
    that token's score; user-defined tokens become added tokens and control tokens special
    added tokens. (transformers' GGUFGemmaConverter makes a Unigram model instead, which
    segments differently, and renames the <0x09> byte token to a second tab token.)
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    if scores is None or types is None or len(scores) != len(tokens) or len(types) != len(tokens):
        raise GGUFConversionError("a SentencePiece GGUF vocabulary needs tokenizer.ggml.scores and "
                                  "tokenizer.ggml.token_type for every token")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFConversionError("the GGUF vocabulary has duplicate tokens")
    normal = sorted((i for i, ty in enumerate(types) if ty == _TOKEN_NORMAL and len(tokens[i]) > 1),
                    key=lambda i: (-scores[i], i))
    merges = []
    for i in normal:
        t = tokens[i]
        splits = sorted((vocab[t[:k]], vocab[t[k:]]) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab)
        merges.extend((tokens[a], tokens[b]) for a, b in splits)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                                   dropout=None))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Added tokens match the raw text before normalization, as llama.cpp's special-token pass does.
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, ty in enumerate(types) if ty == _TOKEN_USER_DEFINED])
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, ty in enumerate(types) if ty in (_TOKEN_UNKNOWN, _TOKEN_CONTROL)])
    return backend


def _build_tokenizer(meta: dict, model_max_length: int | None = None):
    """A transformers fast tokenizer from the GGUF tokenizer metadata (no torch needed)."""
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        return None
    tokenizer_dict = {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                      if f"tokenizer.{key}" in meta}
    tokenizer_type = tokenizer_dict.get("tokenizer_type", "llama")
    if tokenizer_type not in ("llama", "gpt2"):
        raise GGUFConversionError(f"GGUF tokenizer model {tokenizer_type!r} is not supported (llama, gpt2)")
    if tokenizer_type == "llama" and meta.get("general.architecture") == "gemma3":
        if meta.get("tokenizer.ggml.add_space_prefix", False):
            raise GGUFConversionError("a gemma3 SentencePiece vocabulary with add_space_prefix is not supported")
        backend = _spm_bpe_backend(meta)
    else:
        backend, _ = convert_gguf_tokenizer("llama", tokenizer_dict)
    byte_level = tokenizer_type == "gpt2"
    if byte_level:
        backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", not byte_level)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        special = {t: tokens.index(t) for t in (bos if add_bos else None, eos if add_eos else None) if t}
        backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(special.items()))
    elif byte_level:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        backend.post_processor = None

    kwargs: dict[str, Any] = dict(bos_token=bos, eos_token=eos, unk_token=token("unknown") or token("unk"),
                                  pad_token=token("padding") or token("pad"), add_bos_token=add_bos,
                                  add_eos_token=add_eos, clean_up_tokenization_spaces=False,
                                  model_max_length=model_max_length)
    template = meta.get("tokenizer.chat_template")
    if template:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in kwargs.items() if v is not None})


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------

def _save_weights(tensors: Iterator[tuple[str, np.ndarray]], total_bytes: int, out: Path,
                  max_shard_bytes: int) -> list[str]:
    from safetensors.numpy import save_file

    metadata = {"format": "pt"}
    if total_bytes <= max_shard_bytes:
        state = dict(tensors)
        save_file(state, str(out / "model.safetensors"), metadata=metadata)
        return list(state)
    # Fill a shard until the next tensor would overflow it; name the shards once all are known.
    names: list[str] = []
    current: dict[str, np.ndarray] = {}
    size = 0
    tmp_names = []

    def flush():
        nonlocal current, size
        if current:
            tmp = f"shard-{len(tmp_names):05d}.safetensors"
            save_file(current, str(out / tmp), metadata=metadata)
            tmp_names.append((tmp, list(current)))
            current, size = {}, 0

    for name, array in tensors:
        if current and size + array.nbytes > max_shard_bytes:
            flush()
        current[name] = array
        size += array.nbytes
        names.append(name)
    flush()
    n = len(tmp_names)
    weight_map = {}
    for k, (tmp, shard_names) in enumerate(tmp_names):
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update({t: final for t in shard_names})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _current_umask() -> int:
    try:  # read without changing it (os.umask's set-and-restore races with other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _fix_permissions(directory: Path) -> None:
    """mkdtemp makes a 0700 directory (and some writers 0600 files): use the umask's defaults."""
    umask = _current_umask()
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                       overwrite: bool = False, progress: bool = False,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Converts a llama- or gemma3-architecture GGUF file into an HF checkpoint directory at `out_dir`.

    Weights are dequantized to float32. Returns `out_dir`. Raises FileExistsError when
    `out_dir` exists (unless `overwrite`), GGUFConversionError for unsupported files.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir).expanduser().absolute()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")

    meta, tensors = _read_gguf(gguf_path)
    tensor_names = {t.name for t in tensors}
    config = _build_config(meta, tensor_names, gguf_path)
    if "rope_freqs.weight" in tensor_names and config["model_type"] == "llama":
        rope_freqs = next(t for t in tensors if t.name == "rope_freqs.weight")
        config["rope_scaling"] = _llama3_rope_scaling(_dequantize(rope_freqs), config["head_dim"],
                                                      config["rope_theta"])
    if config["vocab_size"] is None:
        embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise GGUFConversionError(f"{gguf_path}: no token_embd.weight tensor")
        config["vocab_size"] = int(embd.shape[-1])
    expected = _expected_shapes(config, o_bias="blk.0.attn_output.bias" in tensor_names)

    def checked() -> Iterator[tuple[str, np.ndarray]]:
        seen = set()
        for name, array in _iter_hf_tensors(tensors, config, gguf_path, progress):
            want = expected.get(name)
            if want is None:
                raise GGUFConversionError(f"{gguf_path}: unexpected tensor {name} for this config")
            if array.shape != want:
                raise GGUFConversionError(f"{gguf_path}: {name} has shape {array.shape}, the config implies {want}")
            seen.add(name)
            yield name, array
        missing = sorted(set(expected) - seen)
        if missing:
            raise GGUFConversionError(f"{gguf_path}: tensors missing from the GGUF file: {', '.join(missing[:8])}"
                                      + (" ..." if len(missing) > 8 else ""))

    total_bytes = sum(4 * int(np.prod(s)) for s in expected.values())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _save_weights(checked(), total_bytes, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {"_from_model_config": True}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in config:
                generation[key] = config[key]
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None and "eos_token_id" in config and int(eot) != config["eos_token_id"]:
            generation["eos_token_id"] = [config["eos_token_id"], int(eot)]
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer = _build_tokenizer(meta, config["max_position_embeddings"])
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        else:
            logger.warning("%s has no tokenizer metadata; %s will have no tokenizer", gguf_path, out_dir)
        _fix_permissions(tmp)
        # Everything is on disk: now swap it into place.
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

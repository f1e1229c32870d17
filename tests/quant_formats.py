"""Writers of pre-quantized checkpoints in the formats the real tools write (GPTQ as
AutoGPTQ / gptqmodel, AWQ GEMM as AutoAWQ / gptqmodel, SqueezeLLM as its pack.py), from
a tiny random transformers model, and the reference: the same transformers model with
every quantized linear replaced by its dequantized weight (numpy, independent of
lmidist_jax's readers).

gptqmodel itself is not used: 7.7.0 (the version on PyPI) would replace the
environment's transformers (5.17 -> 5.24) and build native extensions, so these writers
produce the formats from round-to-nearest quantization instead of GPTQ's Hessian
updates; the files are laid out exactly as the tools lay them out.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file

from tiny_models import make_model

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8
# Tiny but with room for group 128 at TP=2 (o: 256 inputs, down: 512).
SIZES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Projections that read the same input share one act-order permutation (as GPTQ's Hessian
# is the same for them).
SHARED_INPUT = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
                "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up"}


def _pack_words(values: np.ndarray, bits: int, order=None) -> np.ndarray:
    """[..., P] values (last axis: the values of one word) -> [...] int32."""
    pack = 32 // bits
    order = order or tuple(range(pack))
    word = np.zeros(values.shape[:-1], np.uint64)
    for i in range(pack):  # value slot i holds element order[i]
        word |= values[..., order[i]].astype(np.uint64) << np.uint64(bits * i)
    return word.astype(np.uint32).view(np.int32)


def pack_along_input(q: np.ndarray, bits: int) -> np.ndarray:
    """q [in, out] -> [in / P, out]: word r holds rows P*r .. P*r + P - 1 (GPTQ, SqueezeLLM)."""
    pack = 32 // bits
    return _pack_words(q.reshape(q.shape[0] // pack, pack, q.shape[1]).transpose(0, 2, 1), bits)


def pack_along_output(q: np.ndarray, bits: int, order=None) -> np.ndarray:
    """q [rows, out] -> [rows, out / P] (GPTQ qzeros; AWQ qweight / qzeros with AWQ_ORDER)."""
    pack = 32 // bits
    return _pack_words(q.reshape(q.shape[0], q.shape[1] // pack, pack), bits, order)


def quantize_rtn(w: np.ndarray, group: int, bits: int, sym: bool, g_idx: np.ndarray):
    """Round-to-nearest of w [out, in] with the groups of ``g_idx`` ([in] -> group).
    Returns q [in, out], zeros [G, out] (integers), scales [G, out] (float16), and the
    dequantized w [out, in] (float32, from the float16 scales)."""
    maxq = (1 << bits) - 1
    num_groups = int(g_idx.max()) + 1
    out = w.shape[0]
    scales = np.zeros((num_groups, out), np.float16)
    zeros = np.zeros((num_groups, out), np.int64)
    for g in range(num_groups):
        cols = w[:, g_idx == g]
        xmin = np.minimum(cols.min(1), 0)
        xmax = np.maximum(cols.max(1), 0)
        if sym:
            xmax = np.maximum(-xmin, xmax)
            scale = 2 * xmax / maxq
            zero = np.full(out, (maxq + 1) // 2)
        else:
            scale = (xmax - xmin) / maxq
            zero = np.round(-xmin / scale)
        scales[g] = scale.astype(np.float16)
        zeros[g] = np.clip(zero, 0, maxq)
    s = scales.astype(np.float32)[g_idx].T            # [out, in]
    z = zeros[g_idx].T
    q = np.clip(np.round(w / s) + z, 0, maxq).astype(np.int64)
    return q.T, zeros, scales, ((q - z) * s).astype(np.float32)


def _linears(model):
    for name, module in model.named_modules():
        if any(name.endswith(p) for p in PROJECTIONS) and isinstance(module, torch.nn.Linear):
            yield name, module


def make_quantized(directory, family: str = "llama", method: str = "gptq", *, group_size: int = 128,
                   desc_act: bool = False, sym: bool = True, bits: int = 4, checkpoint_format: str = "gptq",
                   seed: int = 0, **overrides):
    """Writes a quantized checkpoint of a tiny ``family`` model into ``directory``;
    returns the transformers reference (its linears dequantized)."""
    directory = str(directory)
    model = make_model(directory, family, seed=seed, **{**SIZES, **overrides})
    os.remove(os.path.join(directory, "model.safetensors"))
    rng = np.random.default_rng(seed + 1)
    tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    perms = {}
    with torch.no_grad():
        for name, linear in _linears(model):
            w = linear.weight.detach().numpy().astype(np.float32).copy()
            out_features, in_features = w.shape
            del tensors[f"{name}.weight"]
            if method == "squeezellm":
                # One sorted 16-value codebook per output channel (values from the row).
                lut = np.sort(rng.choice(w, 16, axis=1, replace=False), axis=1).astype(np.float16)
                q = np.abs(w[:, :, None] - lut.astype(np.float32)[:, None, :]).argmin(-1)  # [out, in]
                deq = np.take_along_axis(lut.astype(np.float32), q, axis=1)
                tensors[f"{name}.qweight"] = pack_along_input(q.T, 4)
                tensors[f"{name}.lookup_table"] = lut
            else:
                group = in_features if group_size == -1 else group_size
                if desc_act:
                    key = (name.rsplit(".", 2)[0], SHARED_INPUT.get(name.split(".", 3)[-1], name))
                    perm = perms.setdefault(key, rng.permutation(in_features))
                    g_idx = np.empty(in_features, np.int32)
                    g_idx[perm] = np.arange(in_features) // group  # the perm[i]-th row is i-th in act order
                else:
                    g_idx = (np.arange(in_features) // group).astype(np.int32)
                if not sym and name.endswith("layers.0.self_attn.q_proj"):
                    # A group with no negative weight has zero point 0: stored as -1 in the "gptq"
                    # format, a borrow across the packed word that a per-value +1 would get wrong.
                    w[:4, g_idx == 0] = np.abs(w[:4, g_idx == 0])
                q, zeros, scales, deq = quantize_rtn(w, group, bits, sym, g_idx)
                tensors[f"{name}.scales"] = scales
                if method == "awq":
                    tensors[f"{name}.qweight"] = pack_along_output(q, bits, AWQ_ORDER)
                    tensors[f"{name}.qzeros"] = pack_along_output(zeros, bits, AWQ_ORDER)
                else:
                    tensors[f"{name}.qweight"] = pack_along_input(q, bits)
                    packed_zeros = pack_along_output(zeros, bits).view(np.uint32)
                    if checkpoint_format == "gptq":  # gptqmodel's v2 -> v1: one subtraction per word
                        packed_zeros = packed_zeros - np.uint32(sum(1 << (bits * j) for j in range(32 // bits)))
                    tensors[f"{name}.qzeros"] = packed_zeros.view(np.int32)
                    tensors[f"{name}.g_idx"] = g_idx
            linear.weight.copy_(torch.from_numpy(deq))
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    if method == "squeezellm":
        with open(os.path.join(directory, "quant_config.json"), "w") as f:
            json.dump({"wbits": 4}, f)
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
                   os.path.join(directory, "packed_weight.pt"))
    else:
        if method == "awq":
            config["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group_size,
                                             "zero_point": True, "version": "gemm"}
        else:
            config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                             "desc_act": desc_act, "sym": sym,
                                             "checkpoint_format": checkpoint_format}
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(path, "w") as f:
        json.dump(config, f)
    return model

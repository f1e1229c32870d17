"""Linear kinds: one call contract for every projection of every model.

A projection is described once by a ``LinearSpec`` (its role, input size, output
shape, logical axes, bias, and how fused checkpoint parts lay out inside it). A model
asks its ``linear_factory`` for a module of the kind its config selects; the decoder
never names a kind. Every kind is called as ``proj(x, md)``: ``x`` is [T, in_features]
and ``md`` is the step's ``StepMetadata``, which carries whatever per-token context a
kind needs (a LoRA slot per token, for instance) without new call signatures.

Kinds register in ``LINEAR_KINDS``; "dense" is the plain ``x @ W + b``. Quantized and
LoRA-carrying kinds add themselves there and take the same ``LinearSpec``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from .step_metadata import StepMetadata


@dataclasses.dataclass(frozen=True)
class FusedLayout:
    """How named checkpoint parts sit inside one fused parameter.

    The parts are concatenated along ``axis`` of the output shape, in order; part
    ``slot`` covers ``dims`` (a slice of the output shape). A part whose checkpoint
    tensor is ``r`` times smaller than ``dims`` has its leading output dimension (KV
    heads) repeated ``r`` times: that is how MQA/GQA heads are replicated when tensor
    parallelism has more devices than KV heads.

    q/k/v for GQA, output shape [KVH, G + 2, D]: axis 1, parts q [KVH, G, D],
    k [KVH, 1, D], v [KVH, 1, D] (KV-head-major, so a TP shard over KVH holds whole
    groups: the fusion is shard-local). gate/up, output shape [2, I]: axis 0, parts
    gate [1, I], up [1, I].
    """

    axis: int
    parts: tuple[tuple[str, tuple[int, ...]], ...]
    replicable: tuple[str, ...] = ()  # slots whose leading dim (KV heads) may be replicated

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(slot for slot, _ in self.parts)


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    role: str                     # "qkv", "o", "gate_up", "up", "down", "lm_head"
    in_features: int
    out_shape: tuple[int, ...]    # output dims; the kernel is [in_features, *out_shape]
    axes: tuple[str | None, ...]  # logical axes of the kernel (input axis first)
    use_bias: bool = False
    fused: FusedLayout | None = None

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)


def param(shape, dtype, axes: tuple[str | None, ...], *, kind: type[nnx.Param] = nnx.Param,
          **metadata) -> nnx.Param:
    """A parameter with logical axes. Values are placeholders: the model is built under
    ``nnx.eval_shape`` and filled from a checkpoint (or random init). ``kind``: the
    variable type (an ``nnx.Param`` subclass lets a filter pick, e.g., LoRA matrices)."""
    assert len(shape) == len(axes), (shape, axes)
    return kind(jnp.zeros(shape, dtype), logical_axes=axes, **metadata)


class DenseLinear(nnx.Module):
    """``y = x @ kernel + bias`` with kernel [in_features, *out_shape]."""

    def __init__(self, spec: LinearSpec, *, dtype):
        self.out_shape = spec.out_shape
        self.kernel = param((spec.in_features, *spec.out_shape), dtype, spec.axes, fused=spec.fused)
        self.bias = (param(spec.out_shape, dtype, spec.axes[1:], fused=spec.fused)
                     if spec.use_bias else None)

    def __call__(self, x: Float[Array, "tokens in_features"], md: StepMetadata | None = None
                 ) -> Float[Array, "tokens *out_shape"]:
        kernel = self.kernel[...].astype(x.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


LINEAR_KINDS: dict[str, type] = {"dense": DenseLinear}


def linear_factory(kind: str, dtype) -> Callable[[LinearSpec], nnx.Module]:
    """The constructor of every projection of a model: ``make(LinearSpec) -> module``."""
    try:
        cls = LINEAR_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown linear kind {kind!r}; available: {', '.join(sorted(LINEAR_KINDS))}") from None
    return lambda spec: cls(spec, dtype=dtype)


# ---------------------------------------------------------------------------------------
# Fused parameters: assembling from checkpoint parts and splitting back
# ---------------------------------------------------------------------------------------

def assemble_fused(parts: dict, layout: FusedLayout, lead: int, xp=jnp):
    """Concatenate checkpoint parts into the fused parameter.

    parts: slot -> array [*lead_dims, n_slot] (flat output); ``lead`` is the number of
    leading (input) dims: 1 for a kernel, 0 for a bias. Parts smaller than their slot
    are KV heads to replicate (see ``FusedLayout``).
    """
    pieces = []
    for slot, dims in layout.parts:
        a = parts[slot]
        lead_dims = a.shape[:lead]
        want = math.prod(dims)
        n = a.shape[-1]
        if n == want:
            a = a.reshape(*lead_dims, *dims)
        else:
            r = want // n
            if slot not in layout.replicable or n * r != want or dims[0] % r:
                raise ValueError(f"checkpoint part {slot!r} has {n} outputs; expected {want}")
            a = a.reshape(*lead_dims, dims[0] // r, *dims[1:])
            a = xp.repeat(a, r, axis=lead)
        pieces.append(a)
    return xp.concatenate(pieces, axis=lead + layout.axis)


def split_fused(value, layout: FusedLayout, lead: int, repeats: int = 1, xp=jnp) -> dict:
    """Inverse of ``assemble_fused``: slot -> flat part [*lead_dims, n]. With
    ``repeats`` > 1, the replicable parts keep one copy of each replicated head."""
    out, start = {}, 0
    for slot, dims in layout.parts:
        size = dims[layout.axis]
        index = [slice(None)] * value.ndim
        index[lead + layout.axis] = slice(start, start + size)
        part = value[tuple(index)]
        if repeats > 1 and slot in layout.replicable:
            index = [slice(None)] * part.ndim
            index[lead] = slice(None, None, repeats)
            part = part[tuple(index)]
        out[slot] = part.reshape(*part.shape[:lead], -1)
        start += size
    return out

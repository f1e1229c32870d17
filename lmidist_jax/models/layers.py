"""Building blocks of the generic decoder: norms, embeddings and the dense MLP kinds
(gated, plain; the table of MLP kinds is ``mlp_kinds.py``).

Every parameter carries logical axis names (``logical_axes`` metadata) that the
sharding rules map onto the device mesh. Projections come from the model's linear
factory (``linear.py``), so a block never knows which linear kind it holds.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from pallas_kernels import fused_ops

from .linear import FusedLayout, LinearSpec, param
from .step_metadata import StepMetadata

# LMIDIST_FUSED_OPS: "auto" (the fused Pallas glue kernels on GPU backends, XLA on the
# CPU), "off" (XLA everywhere: the A/B baseline), "interpret" (the kernels in Pallas
# interpret mode on any backend: tests).
FUSED_OPS_MODES = ("auto", "off", "interpret")


def fused_ops_mode(md) -> str | None:
    """How this step runs the fused glue kernels (pallas_kernels/fused_ops.py): "pallas",
    "interpret", or None (plain XLA). Read at trace time."""
    mode = os.environ.get("LMIDIST_FUSED_OPS", "auto")
    if mode not in FUSED_OPS_MODES:
        raise ValueError(f"LMIDIST_FUSED_OPS={mode!r} is not valid; accepted: {', '.join(FUSED_OPS_MODES)}")
    if mode == "off" or getattr(md, "dense_causal", False):  # a training forward: plain XLA (differentiable)
        return None
    if mode == "interpret":
        return "interpret"
    return None if md.backend == "xla" else "pallas"


class Norm(nnx.Module):
    """RMSNorm or LayerNorm, computed in float32. ``scale_plus_one`` is Gemma's (1 + w);
    ``affine=False``: no learned scale or bias."""

    def __init__(self, size: int, *, norm_type: str, eps: float, scale_plus_one: bool = False,
                 bias: bool = True, affine: bool = True, dtype=jnp.float32):
        if norm_type not in ("rms", "layer"):
            raise ValueError(f"unknown norm type {norm_type!r}; expected 'rms' or 'layer'")
        self.norm_type = norm_type
        self.eps = eps
        self.scale_plus_one = scale_plus_one
        self.scale = param((size,), dtype, ("norm",)) if affine else None
        self.bias = param((size,), dtype, ("norm",)) if norm_type == "layer" and bias and affine else None

    @classmethod
    def of(cls, spec, size: int | None = None, *, norm_type: str | None = None, dtype):
        """The model's norm (type, eps, Gemma's 1 + w, bias) over ``size`` features."""
        return cls(size or spec.hidden_size, norm_type=norm_type or spec.norm_type, eps=spec.norm_eps,
                   scale_plus_one=spec.norm_scale_plus_one, bias=spec.norm_bias, affine=spec.norm_affine,
                   dtype=dtype)

    def __call__(self, x: Float[Array, "*rows features"]) -> Float[Array, "*rows features"]:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.norm_type == "rms":
            x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
            x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            scale = self.scale[...].astype(jnp.float32)
            x = x * (scale + 1.0 if self.scale_plus_one else scale)
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(dtype)

    def add_and_norm(self, x: Float[Array, "tokens features"], delta: Float[Array, "tokens features"] | None,
                     mode: str | None = None) -> tuple[Float[Array, "tokens features"], Float[Array, "tokens features"]]:
        """(x + delta, norm(x + delta)); delta None: (x, norm(x)). ``mode`` (fused_ops_mode)
        runs an RMSNorm as one fused kernel instead of XLA's add, reduction and scaling."""
        if mode and self.norm_type == "rms" and self.scale is not None:
            return fused_ops.add_rms_norm(x, delta, self.scale[...], eps=self.eps,
                                          scale_plus_one=self.scale_plus_one, interpret=mode == "interpret")
        if delta is not None:
            x = x + delta
        return x, self(x)


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, size: int, *, dtype=jnp.float32):
        self.embedding = param((vocab_size, size), dtype, ("vocab", "embed"))

    def __call__(self, token_ids: Int[Array, "tokens"]) -> Float[Array, "tokens embed"]:
        return jnp.take(self.embedding[...], token_ids, axis=0)

    def attend(self, x: Float[Array, "tokens embed"]) -> Float[Array, "tokens vocab"]:
        """Tied LM head: x [N, embed] -> logits [N, vocab]."""
        return jnp.dot(x, self.embedding[...].astype(x.dtype).T)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation_fn(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}") from None


class GatedMLP(nnx.Module):
    """``act(x W_gate) * (x W_up)`` then ``W_down``; gate and up are one fused matmul
    with kernel [embed, 2, mlp] (sharded over mlp, so the fusion is shard-local)."""

    def __init__(self, spec, make_linear, *, dtype=None, mesh=None):
        e, inner = spec.hidden_size, spec.intermediate_size
        self.act = activation_fn(spec.activation)
        self.gate_up_proj = make_linear(LinearSpec(
            "gate_up", e, (2, inner), ("embed", None, "mlp"), use_bias=spec.mlp_bias,
            fused=FusedLayout(axis=0, parts=(("gate", (1, inner)), ("up", (1, inner))))))
        self.down_proj = make_linear(LinearSpec("down", inner, (e,), ("mlp", "embed"), use_bias=spec.mlp_bias))

    def __call__(self, x: Float[Array, "tokens embed"], md: StepMetadata | None) -> Float[Array, "tokens embed"]:
        gate_up = self.gate_up_proj(x, md)  # [T, 2, mlp]
        return self.down_proj(self.act(gate_up[:, 0]) * gate_up[:, 1], md)


class PlainMLP(nnx.Module):
    """``act(x W_up) W_down`` (GPT-2, NeoX, Falcon, Phi, StarCoder)."""

    def __init__(self, spec, make_linear, *, dtype=None, mesh=None):
        e, inner = spec.hidden_size, spec.intermediate_size
        self.act = activation_fn(spec.activation)
        self.up_proj = make_linear(LinearSpec("up", e, (inner,), ("embed", "mlp"), use_bias=spec.mlp_bias))
        self.down_proj = make_linear(LinearSpec("down", inner, (e,), ("mlp", "embed"), use_bias=spec.mlp_bias))

    def __call__(self, x: Float[Array, "tokens embed"], md: StepMetadata | None) -> Float[Array, "tokens embed"]:
        return self.down_proj(self.act(self.up_proj(x, md)), md)


"""Building blocks of the generic decoder: linear layers, norms, embeddings, MLPs.

Every parameter carries logical axis names (``logical_axes`` metadata) that the
sharding rules map onto the device mesh. A linear layer is one module type per
weight format (dense now; quantized and LoRA-carrying variants share its call
signature), so the model never knows which variant it holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(shape, dtype, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter with logical axes. Values are placeholders: the model is built under
    ``nnx.eval_shape`` and filled from a checkpoint (or random init)."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class Linear(nnx.Module):
    """Dense ``y = x @ kernel + bias`` with kernel [in_features, out_features]."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool = False, dtype=jnp.float32):
        self.kernel = param((in_features, out_features), dtype, axes)
        self.bias = param((out_features,), dtype, (axes[1],)) if use_bias else None

    def __call__(self, x):
        y = jnp.dot(x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm or LayerNorm, computed in float32. ``scale_plus_one`` is Gemma's (1 + w)."""

    def __init__(self, size: int, *, norm_type: str, eps: float, scale_plus_one: bool = False,
                 dtype=jnp.float32):
        self.norm_type = norm_type
        self.eps = eps
        self.scale_plus_one = scale_plus_one
        self.scale = param((size,), dtype, ("norm",))
        self.bias = param((size,), dtype, ("norm",)) if norm_type == "layer" else None

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.norm_type == "rms":
            x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
            x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.scale_plus_one:
            scale = scale + 1.0
        x = x * scale
        if self.bias is not None:
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(dtype)


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, size: int, *, dtype=jnp.float32):
        self.embedding = param((vocab_size, size), dtype, ("vocab", "embed"))

    def __call__(self, token_ids):
        return jnp.take(self.embedding[...], token_ids, axis=0)

    def attend(self, x):
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


class MLP(nnx.Module):
    """Gated (act(x W_gate) * x W_up) W_down, or plain act(x W_up) W_down."""

    def __init__(self, hidden: int, intermediate: int, *, gated: bool, activation: str,
                 use_bias: bool, dtype):
        self.gated = gated
        self.act = activation_fn(activation)
        self.gate_proj = (Linear(hidden, intermediate, axes=("embed", "mlp"), use_bias=use_bias, dtype=dtype)
                          if gated else None)
        self.up_proj = Linear(hidden, intermediate, axes=("embed", "mlp"), use_bias=use_bias, dtype=dtype)
        self.down_proj = Linear(intermediate, hidden, axes=("mlp", "embed"), use_bias=use_bias, dtype=dtype)

    def __call__(self, x):
        if self.gated:
            h = self.act(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = self.act(self.up_proj(x))
        return self.down_proj(h)

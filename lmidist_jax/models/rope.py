"""Rotary position embeddings: inverse frequencies for each HF rope_scaling type,
and their application to query/key heads at arbitrary (per-token) positions."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float32, Int

from .spec import ModelSpec


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def rope_tables(spec: ModelSpec, max_model_len: int | None = None):
    """Returns (inv_freq, long_inv_freq or None, switch_position, attention_scaling).

    ``long_inv_freq`` applies to tokens at positions >= ``switch_position`` (dynamic NTK
    beyond the original context); None when one table covers every position.
    """
    dim = spec.rotary_dim or spec.head_dim
    inv_freq = _default_inv_freq(spec.rope_theta, dim)
    scaling = spec.rope_scaling
    if not scaling:
        return inv_freq.astype(np.float32), None, 0, 1.0
    rope_type = scaling["rope_type"]
    factor = float(scaling.get("factor") or 1.0)

    if rope_type == "linear":
        return (inv_freq / factor).astype(np.float32), None, 0, 1.0

    if rope_type == "dynamic":
        # HF recomputes the base once a sequence outgrows the original context; within
        # it the default frequencies apply (exact parity). Beyond, we use the base for
        # the longest sequence the engine admits (as vLLM does), a fixed table.
        original = spec.max_position_embeddings
        seq_len = max(max_model_len or spec.max_model_len, original)
        base = spec.rope_theta * ((factor * seq_len / original) - (factor - 1)) ** (dim / (dim - 2))
        long_inv = _default_inv_freq(base, dim)
        return inv_freq.astype(np.float32), long_inv.astype(np.float32), original, 1.0

    if rope_type == "llama3":
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        old_context = float(scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32), None, 0, 1.0

    if rope_type == "yarn":
        original = float(scaling.get("original_max_position_embeddings") or spec.max_position_embeddings)
        attention_factor = scaling.get("attention_factor")
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            else:
                attention_factor = get_mscale(factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(rotations):
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(spec.rope_theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation_factor = 1 - ramp
        pos_freqs = spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
        return inv.astype(np.float32), None, 0, float(attention_factor)

    raise ValueError(f"unsupported rope_scaling type {rope_type!r}")


class RotaryEmbedding:
    """Applies rotary embeddings; built once per model, called inside the jitted step."""

    def __init__(self, spec: ModelSpec, max_model_len: int | None = None):
        inv, long_inv, switch, scaling = rope_tables(spec, max_model_len)
        self.inv_freq = inv
        self.long_inv_freq = long_inv
        self.switch_position = switch
        self.attention_scaling = scaling
        self.rotary_dim = spec.rotary_dim or spec.head_dim
        self.interleaved = spec.rope_interleaved

    def cos_sin(self, positions: Int[Array, "tokens"]
                ) -> tuple[Float32[Array, "tokens rotary_half"], Float32[Array, "tokens rotary_half"]]:
        """cos, sin of each token's position, over rotary_dim // 2 frequencies."""
        pos = positions.astype(jnp.float32)[:, None]
        freqs = pos * jnp.asarray(self.inv_freq)[None, :]
        if self.long_inv_freq is not None:
            long_freqs = pos * jnp.asarray(self.long_inv_freq)[None, :]
            freqs = jnp.where(positions[:, None] >= self.switch_position, long_freqs, freqs)
        return jnp.cos(freqs) * self.attention_scaling, jnp.sin(freqs) * self.attention_scaling

    def apply(self, x: Float[Array, "tokens heads head_dim"], cos: Float32[Array, "tokens rotary_half"],
              sin: Float32[Array, "tokens rotary_half"]) -> Float[Array, "tokens heads head_dim"]:
        """Rotates the first rotary_dim features of each head."""
        dtype = x.dtype
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        rot = rot.astype(jnp.float32)
        cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
        else:
            half = self.rotary_dim // 2
            x1, x2 = rot[..., :half], rot[..., half:]
            out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        out = out.astype(dtype)
        return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out

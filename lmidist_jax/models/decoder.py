"""The generic decoder-only transformer, configured entirely by a ModelSpec.

It runs over a flat batch of tokens from many sequences (the rolling batch) and
the paged KV cache; see ``attention.AttentionMetadata`` for how tokens map to pages.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from .attention import AttentionMetadata, paged_attention, write_kv
from .layers import MLP, Embedding, Linear, Norm, param
from .rope import RotaryEmbedding
from .spec import ModelSpec


class Attention(nnx.Module):
    def __init__(self, spec: ModelSpec, rotary: RotaryEmbedding | None, dtype):
        self.spec = spec
        self.rotary = rotary
        e = spec.hidden_size
        self.q_proj = Linear(e, spec.q_size, axes=("embed", "heads"), use_bias=spec.qkv_bias, dtype=dtype)
        self.k_proj = Linear(e, spec.kv_size, axes=("embed", "kv_heads"), use_bias=spec.qkv_bias, dtype=dtype)
        self.v_proj = Linear(e, spec.kv_size, axes=("embed", "kv_heads"), use_bias=spec.qkv_bias, dtype=dtype)
        self.o_proj = Linear(spec.q_size, e, axes=("heads", "embed"), use_bias=spec.o_bias, dtype=dtype)

    def __call__(self, x, kv_cache, md: AttentionMetadata, cos_sin, alibi_slopes):
        spec = self.spec
        num_tokens = x.shape[0]
        q = self.q_proj(x).reshape(num_tokens, spec.num_heads, spec.head_dim)
        k = self.k_proj(x).reshape(num_tokens, spec.num_kv_heads, spec.head_dim)
        v = self.v_proj(x).reshape(num_tokens, spec.num_kv_heads, spec.head_dim)
        if self.rotary is not None:
            cos, sin = cos_sin
            q = self.rotary.apply(q, cos, sin)
            k = self.rotary.apply(k, cos, sin)
        k_pages, v_pages = write_kv(*kv_cache, k, v, md)
        out = paged_attention(q, k_pages, v_pages, md, scale=spec.scale,
                              sliding_window=spec.sliding_window,
                              soft_cap=spec.attn_logit_softcap, alibi_slopes=alibi_slopes)
        return self.o_proj(out.reshape(num_tokens, spec.q_size)), (k_pages, v_pages)


class DecoderLayer(nnx.Module):
    def __init__(self, spec: ModelSpec, rotary, dtype):
        self.parallel_residual = spec.parallel_residual
        norm = dict(norm_type=spec.norm_type, eps=spec.norm_eps,
                    scale_plus_one=spec.norm_scale_plus_one, dtype=dtype)
        self.input_norm = Norm(spec.hidden_size, **norm)
        self.attn = Attention(spec, rotary, dtype)
        self.post_attn_norm = Norm(spec.hidden_size, **norm)
        self.mlp = MLP(spec.hidden_size, spec.intermediate_size, gated=spec.mlp_type == "gated",
                       activation=spec.activation, use_bias=spec.mlp_bias, dtype=dtype)

    def __call__(self, x, kv_cache, md, cos_sin, alibi_slopes):
        h = self.input_norm(x)
        attn_out, kv_cache = self.attn(h, kv_cache, md, cos_sin, alibi_slopes)
        if self.parallel_residual:
            # GPT-J/NeoX/Falcon: x + attn(ln1(x)) + mlp(ln2(x)).
            return x + attn_out + self.mlp(self.post_attn_norm(x)), kv_cache
        x = x + attn_out
        return x + self.mlp(self.post_attn_norm(x)), kv_cache


class DecoderModel(nnx.Module):
    """Embedding -> N decoder layers -> final norm -> LM head."""

    def __init__(self, spec: ModelSpec, dtype=jnp.float32, max_model_len: int | None = None):
        self.spec = spec
        self.dtype = dtype
        self.embed = Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype)
        rotary = RotaryEmbedding(spec, max_model_len) if spec.position_type == "rope" else None
        self.rotary = rotary
        if spec.position_type == "learned":
            self.position_embed = param((spec.max_position_embeddings, spec.hidden_size), dtype,
                                        (None, "embed"))
        else:
            self.position_embed = None
        self.layers = nnx.List([DecoderLayer(spec, rotary, dtype) for _ in range(spec.num_layers)])
        self.final_norm = Norm(spec.hidden_size, norm_type=spec.norm_type, eps=spec.norm_eps,
                               scale_plus_one=spec.norm_scale_plus_one, dtype=dtype)
        self.lm_head = (None if spec.tie_word_embeddings else
                        Linear(spec.hidden_size, spec.vocab_size, axes=("embed", "vocab"), dtype=dtype))

    def __call__(self, token_ids, kv_caches, md: AttentionMetadata):
        """token_ids [T] -> (hidden [T, embed], updated kv_caches)."""
        x = self.embed(token_ids).astype(self.dtype)
        if self.spec.embedding_multiplier is not None:
            x = x * jnp.asarray(self.spec.embedding_multiplier, self.dtype)
        if self.position_embed is not None:
            x = x + jnp.take(self.position_embed[...], md.positions, axis=0).astype(self.dtype)
        cos_sin = self.rotary.cos_sin(md.positions) if self.rotary is not None else None
        alibi_slopes = alibi_slopes_for(self.spec.num_heads) if self.spec.position_type == "alibi" else None
        new_caches = []
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, kv_cache = layer(x, kv_cache, md, cos_sin, alibi_slopes)
            new_caches.append(kv_cache)
        return self.final_norm(x), new_caches

    def logits(self, hidden):
        """hidden [N, embed] -> float32 logits [N, vocab]."""
        if self.lm_head is None:
            logits = self.embed.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = logits.astype(jnp.float32)
        if self.spec.final_logit_softcap is not None:
            cap = self.spec.final_logit_softcap
            logits = cap * jnp.tanh(logits / cap)
        return logits


def alibi_slopes_for(num_heads: int):
    """ALiBi head slopes (Press et al.), including the non-power-of-two rule."""
    import math

    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** (2 * i + 1) for i in range(num_heads - closest)]
    return jnp.asarray(slopes, jnp.float32)

"""The generic decoder-only transformer, configured entirely by a ModelSpec.

It runs over a flat batch of tokens from many sequences (the rolling batch) and
the paged KV cache; see ``step_metadata.StepMetadata`` for how tokens map to pages.
Every family is this one decoder: its spec picks the norms, positions, residual
layout, MLP kind and per-layer variants; its weight map fills the parameters.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ..parallel import TP_AXIS
from .attention import paged_attention, write_kv
from .layers import Embedding, Norm, make_mlp
from .linear import FusedLayout, LinearSpec, linear_factory, param
from .rope import RotaryEmbedding
from .spec import ModelSpec
from .step_metadata import StepMetadata


def qkv_linear_spec(spec: ModelSpec, layer: int) -> LinearSpec:
    """q, k and v of ``layer`` as one matmul. The kernel is [embed, KVH, G + 2, D] (per KV
    head: its G query heads, its key, its value), sharded over KV heads, so every device
    computes whole groups with one local matmul, whatever the tensor-parallel degree."""
    kv_heads, head_dim = spec.layer_kv_heads(layer), spec.head_dim
    group = spec.num_heads // kv_heads
    layout = FusedLayout(axis=1, parts=(("q", (kv_heads, group, head_dim)), ("k", (kv_heads, 1, head_dim)),
                                        ("v", (kv_heads, 1, head_dim))), replicable=("k", "v"))
    return LinearSpec("qkv", spec.hidden_size, (kv_heads, group + 2, head_dim),
                      ("embed", "kv_heads", None, None), use_bias=spec.qkv_bias, fused=layout)


class Attention(nnx.Module):
    def __init__(self, spec: ModelSpec, layer: int, make_linear, mesh: Mesh | None, dtype):
        self.spec = spec
        self.mesh = mesh
        self.sliding_window = spec.layer_window(layer)
        self.scale = spec.layer_scale(layer)
        self.rope = spec.layer_rope(layer) if spec.position_type == "rope" else None
        self.num_kv_heads = spec.layer_kv_heads(layer)
        self.qkv_proj = make_linear(qkv_linear_spec(spec, layer))
        self.o_proj = make_linear(LinearSpec("o", spec.q_size, (spec.hidden_size,), ("heads", "embed"),
                                             use_bias=spec.o_bias))
        if spec.qk_norm:
            # Per head, or (MPT qk_ln) over all of q and all of k; MPT is MHA, so the KV heads
            # of k are never replicated for tensor parallelism.
            q_size, k_size = (spec.head_dim,) * 2 if spec.qk_norm_per_head else (spec.q_size, spec.kv_size)
            self.q_norm = Norm.of(spec, q_size, norm_type=spec.qk_norm, dtype=dtype)
            self.k_norm = Norm.of(spec, k_size, norm_type=spec.qk_norm, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, kv_cache, md: StepMetadata, rotary: dict, alibi_slopes):
        spec = self.spec
        num_tokens = x.shape[0]
        group = spec.num_heads // self.num_kv_heads
        qkv = self.qkv_proj(x, md)  # [T, KVH, G + 2, D]
        if spec.clip_qkv is not None:
            qkv = jnp.clip(qkv, -spec.clip_qkv, spec.clip_qkv)
        q = qkv[:, :, :group].reshape(num_tokens, spec.num_heads, spec.head_dim)
        k, v = qkv[:, :, group], qkv[:, :, group + 1]
        if self.q_norm is not None and spec.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.q_norm is not None:  # over all heads (q is head-sharded under TP: XLA reduces across)
            q = self.q_norm(q.reshape(num_tokens, -1)).reshape(q.shape)
            k = self.k_norm(k.reshape(num_tokens, -1)).reshape(k.shape)
        if self.rope is not None:
            emb, (cos, sin) = rotary[self.rope]
            q, k = emb.apply(q, cos, sin), emb.apply(k, cos, sin)
        k_pages, v_pages = write_kv(*kv_cache, k, v, md)
        out = paged_attention(q, k_pages, v_pages, md, mesh=self.mesh, scale=self.scale,
                              sliding_window=self.sliding_window,
                              soft_cap=spec.attn_logit_softcap, alibi_slopes=alibi_slopes)
        return self.o_proj(out.reshape(num_tokens, spec.q_size), md), (k_pages, v_pages)


class DecoderLayer(nnx.Module):
    def __init__(self, spec: ModelSpec, layer: int, make_linear, mesh, dtype):
        self.parallel_residual = spec.parallel_residual
        self.post_norm = spec.post_norm
        self.residual_from_norm = spec.residual_from_norm
        if spec.parallel_residual and (spec.post_norm or spec.residual_from_norm):
            raise ValueError("post_norm and residual_from_norm are sequential-residual layouts")
        self.input_norm = Norm.of(spec, dtype=dtype)
        self.attn = Attention(spec, layer, make_linear, mesh, dtype)
        shared = spec.parallel_residual and spec.shared_input_norm
        self.pre_mlp_norm = None if shared else Norm.of(spec, dtype=dtype)
        self.attn_out_norm = Norm.of(spec, dtype=dtype) if spec.sandwich_norms else None
        self.mlp_out_norm = Norm.of(spec, dtype=dtype) if spec.sandwich_norms else None
        self.mlp = make_mlp(spec, make_linear, dtype, mesh)

    def _mlp(self, h, md):
        out = self.mlp(h, md)
        return out if self.mlp_out_norm is None else self.mlp_out_norm(out)

    def __call__(self, x, kv_cache, md, rotary, alibi_slopes):
        h = x if self.post_norm else self.input_norm(x)
        attn_out, kv_cache = self.attn(h, kv_cache, md, rotary, alibi_slopes)
        if self.attn_out_norm is not None:
            attn_out = self.attn_out_norm(attn_out)
        if self.parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x)), or mlp(ln1(x)) with one shared norm.
            mlp_in = h if self.pre_mlp_norm is None else self.pre_mlp_norm(x)
            return x + attn_out + self._mlp(mlp_in, md), kv_cache
        if self.post_norm:  # OPT-350m: norm after each residual add
            x = self.input_norm(x + attn_out)
            return self.pre_mlp_norm(x + self._mlp(x, md)), kv_cache
        # BLOOM's apply_residual_connection_post_layernorm adds to the normed input instead.
        x = (h if self.residual_from_norm else x) + attn_out
        h = self.pre_mlp_norm(x)
        return (h if self.residual_from_norm else x) + self._mlp(h, md), kv_cache


class DecoderModel(nnx.Module):
    """Embedding -> N decoder layers -> final norm -> LM head.

    ``mesh``: the device mesh the parameters sit on (attention runs per shard under
    it); None on one device.
    """

    def __init__(self, spec: ModelSpec, dtype=jnp.float32, max_model_len: int | None = None,
                 mesh: Mesh | None = None):
        self.spec = spec
        self.dtype = dtype
        if mesh is not None and mesh.shape[TP_AXIS] == 1:
            mesh = None
        make_linear = linear_factory(spec.linear_kind, dtype)
        embed_size = spec.word_embed_size or spec.hidden_size
        self.embed = Embedding(spec.vocab_size, embed_size, dtype=dtype)
        self.embed_norm = Norm.of(spec, embed_size, dtype=dtype) if spec.embedding_norm else None
        # OPT-350m: embeddings (and the tied head) narrower than the layers. Small: replicated.
        projected = embed_size != spec.hidden_size
        self.project_in = (make_linear(LinearSpec("project_in", embed_size, (spec.hidden_size,), ("embed", "embed")))
                           if projected else None)
        self.project_out = (make_linear(LinearSpec("project_out", spec.hidden_size, (embed_size,), ("embed", "embed")))
                            if projected else None)
        self.rotary = {}
        if spec.position_type == "rope":
            kinds = {spec.layer_rope(i) for i in range(spec.num_layers)}
            self.rotary = {kind: RotaryEmbedding(_rope_spec(spec, kind), max_model_len) for kind in sorted(kinds)}
        if spec.position_type == "learned":
            self.position_embed = param((spec.max_position_embeddings + spec.position_offset, spec.hidden_size),
                                        dtype, (None, "embed"))
        else:
            self.position_embed = None
        self.layers = nnx.List([DecoderLayer(spec, i, make_linear, mesh, dtype) for i in range(spec.num_layers)])
        self.final_norm = Norm.of(spec, dtype=dtype) if spec.final_norm else None
        self.lm_head = (None if spec.tie_word_embeddings else
                        make_linear(LinearSpec("lm_head", embed_size, (spec.vocab_size,),
                                               ("embed", "vocab"), use_bias=spec.lm_head_bias)))

    def __call__(self, token_ids, kv_caches, md: StepMetadata):
        """token_ids [T] -> (hidden [T, embed], updated kv_caches)."""
        with _matmul_precision(self.dtype):
            return self._forward(token_ids, kv_caches, md)

    def _forward(self, token_ids, kv_caches, md: StepMetadata):
        spec = self.spec
        x = self.embed(token_ids).astype(self.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if spec.embedding_multiplier is not None:
            x = x * jnp.asarray(spec.embedding_multiplier, self.dtype)
        if self.project_in is not None:
            x = self.project_in(x, md)
        if self.position_embed is not None:
            rows = md.positions + spec.position_offset
            x = x + jnp.take(self.position_embed[...], rows, axis=0).astype(self.dtype)
        rotary = {kind: (emb, emb.cos_sin(md.positions)) for kind, emb in self.rotary.items()}
        alibi_slopes = None
        if spec.position_type == "alibi":
            alibi_slopes = alibi_slopes_for(spec.num_heads, spec.alibi_bias_max) * spec.alibi_scale
        new_caches = []
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, kv_cache = layer(x, kv_cache, md, rotary, alibi_slopes)
            new_caches.append(kv_cache)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x, md)
        return x, new_caches

    def logits(self, hidden, md: StepMetadata | None = None):
        """hidden [N, embed] -> float32 logits [N, vocab]."""
        with _matmul_precision(self.dtype):
            logits = self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden, md)
        logits = logits.astype(jnp.float32)
        if self.spec.final_logit_softcap is not None:
            cap = self.spec.final_logit_softcap
            logits = cap * jnp.tanh(logits / cap)
        return logits


def _matmul_precision(dtype):
    """float32 models get float32 matmuls: XLA on a GPU would otherwise run them in TF32
    (about 1e-3 relative error), which a user asking for fp32 does not expect."""
    return jax.default_matmul_precision("highest" if jnp.dtype(dtype) == jnp.float32 else "default")


def _rope_spec(spec: ModelSpec, kind: str) -> ModelSpec:
    """The spec a rotary table is built from: Gemma 3's local layers have their own base
    and no scaling."""
    if kind == "local":
        return dataclasses.replace(spec, rope_theta=spec.rope_local_theta, rope_scaling=None)
    return spec


def alibi_slopes_for(num_heads: int, bias_max: float = 8.0):
    """ALiBi head slopes as MPT's gen_slopes computes them: with n' the power of two >= n,
    2^(-bias_max * k / n') for k = 1..n', then (n' != n) the even k followed by the odd k,
    n in all. With bias_max 8 these are Press et al.'s slopes (BLOOM's build_alibi_tensor:
    2^(-8k/m) for the power of two m <= n, then the odd k of 2m), for any n."""
    padded = 2 ** math.ceil(math.log2(num_heads))
    slopes = [2.0 ** (-bias_max * k / padded) for k in range(1, padded + 1)]
    if padded != num_heads:
        slopes = (slopes[1::2] + slopes[::2])[:num_heads]
    return jnp.asarray(slopes, jnp.float32)

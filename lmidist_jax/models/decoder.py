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
from einops import rearrange
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Float, Float32, Int

from pallas_kernels.array_types import KVPages
from pallas_kernels.reference import RelativeBias

from ..parallel import TP_AXIS
from .attention import attention_without_cache, paged_attention, paged_cross_attention, write_kv
from pallas_kernels import fused_ops

from .layers import Embedding, Norm, fused_ops_mode
from .linear import FusedLayout, LinearSpec, linear_factory, param
from .mlp_kinds import make_mlp
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
    """Self-attention. With a KV cache: causal, over the paged cache. Without one: among the
    step's own tokens of each sequence, bidirectional (an encoder pass) or causal (a
    training forward, ``md.dense_causal``)."""

    def __init__(self, spec: ModelSpec, layer: int, make_linear, mesh: Mesh | None, dtype):
        self.spec = spec
        self.mesh = mesh
        self.sliding_window = spec.layer_window(layer)
        self.scale = spec.layer_scale(layer)
        self.rope = spec.layer_rope(layer) if spec.position_type == "rope" else None
        self.num_kv_heads = spec.layer_kv_heads(layer)
        # One kernel can rotate q and k and write the pages when nothing runs between the
        # projection and the rotation (no clip, no q/k norm) and the rotary is the plain
        # half-split one over all of head_dim; on one device (no shard_map around it).
        self.rope_fusable = (self.rope is not None and mesh is None and spec.clip_qkv is None
                             and not spec.qk_norm and not spec.rope_interleaved
                             and (spec.rotary_dim or spec.head_dim) == spec.head_dim)
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

    def __call__(self, x: Float[Array, "tokens embed"], kv_cache: tuple[KVPages, KVPages] | None, md: StepMetadata, rotary: dict,
                 alibi_slopes: Float[Array, "heads"] | None, relative_bias: RelativeBias | None = None
                 ) -> tuple[Float[Array, "tokens embed"], tuple[KVPages, KVPages] | None]:
        spec = self.spec
        group = spec.num_heads // self.num_kv_heads
        qkv = self.qkv_proj(x, md)  # [T, KVH, G + 2, D]
        if kv_cache is not None and self.rope_fusable and (mode := fused_ops_mode(md)):
            emb, (cos, sin) = rotary[self.rope]
            q, k_pages, v_pages = fused_ops.rope_write_kv(qkv, cos, sin, *kv_cache, md.slot_mapping,
                                                          interpret=mode == "interpret")
            return self._paged_attention(q, k_pages, v_pages, md, alibi_slopes, relative_bias)
        if spec.clip_qkv is not None:
            qkv = jnp.clip(qkv, -spec.clip_qkv, spec.clip_qkv)
        # Per KV head: its G query heads, its key, its value. Query head h is KV head h // G.
        q = rearrange(qkv[:, :, :group], "t k g d -> t (k g) d")
        k, v = qkv[:, :, group], qkv[:, :, group + 1]
        if self.q_norm is not None and spec.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.q_norm is not None:  # over all heads (q is head-sharded under TP: XLA reduces across)
            q = rearrange(self.q_norm(rearrange(q, "t h d -> t (h d)")), "t (h d) -> t h d", d=spec.head_dim)
            k = rearrange(self.k_norm(rearrange(k, "t k d -> t (k d)")), "t (k d) -> t k d", d=spec.head_dim)
        if self.rope is not None:
            emb, (cos, sin) = rotary[self.rope]
            q, k = emb.apply(q, cos, sin), emb.apply(k, cos, sin)
        if kv_cache is None:  # an encoder pass, or a training forward (md.dense_causal)
            out = attention_without_cache(q, k, v, md, scale=self.scale, sliding_window=self.sliding_window,
                                          soft_cap=spec.attn_logit_softcap, alibi_slopes=alibi_slopes,
                                          relative_bias=relative_bias)
            return self.o_proj(rearrange(out, "t h d -> t (h d)"), md), None
        k_pages, v_pages = write_kv(*kv_cache, k, v, md)
        return self._paged_attention(q, k_pages, v_pages, md, alibi_slopes, relative_bias)

    def _paged_attention(self, q, k_pages, v_pages, md, alibi_slopes, relative_bias):
        """q [T, H, D] over the paged cache (already holding this step's keys), then o_proj."""
        spec = self.spec
        out = paged_attention(q, k_pages, v_pages, md, mesh=self.mesh, scale=self.scale,
                              sliding_window=self.sliding_window,
                              soft_cap=spec.attn_logit_softcap, alibi_slopes=alibi_slopes,
                              relative_bias=relative_bias)
        return self.o_proj(rearrange(out, "t h d -> t (h d)"), md), (k_pages, v_pages)


class CrossAttention(nnx.Module):
    """A decoder layer's attention over the encoder's output (T5's EncDecAttention). Its
    K/V are computed once per request (``write``) into the sequence's cross blocks of the
    layer's paged cache; every decoder step then reads them (non-causal, no position bias)."""

    def __init__(self, spec: ModelSpec, make_linear, mesh: Mesh | None):
        self.spec = spec
        self.mesh = mesh
        kv_heads, head_dim = spec.num_kv_heads, spec.head_dim
        self.q_proj = make_linear(LinearSpec("cross_q", spec.hidden_size, (spec.q_size,), ("embed", "heads")))
        layout = FusedLayout(axis=1, parts=(("k", (kv_heads, 1, head_dim)), ("v", (kv_heads, 1, head_dim))))
        self.kv_proj = make_linear(LinearSpec("cross_kv", spec.hidden_size, (kv_heads, 2, head_dim),
                                              ("embed", "kv_heads", None, None), fused=layout))
        self.o_proj = make_linear(LinearSpec("cross_o", spec.q_size, (spec.hidden_size,), ("heads", "embed")))

    def write(self, encoder_out: Float[Array, "tokens embed"], kv_cache: tuple[KVPages, KVPages], encoder_md: StepMetadata) -> tuple[KVPages, KVPages]:
        """The encoder's output -> its K/V written at encoder_md.slot_mapping (the cross blocks)."""
        kv = self.kv_proj(encoder_out, encoder_md)  # [E, KVH, 2, D]
        return write_kv(*kv_cache, kv[:, :, 0], kv[:, :, 1], encoder_md)

    def __call__(self, x: Float[Array, "tokens embed"], kv_cache: tuple[KVPages, KVPages], md: StepMetadata) -> Float[Array, "tokens embed"]:
        q = rearrange(self.q_proj(x, md), "t (h d) -> t h d", d=self.spec.head_dim)
        out = paged_cross_attention(q, *kv_cache, md, mesh=self.mesh, scale=self.spec.scale)
        return self.o_proj(rearrange(out, "t h d -> t (h d)"), md)


class DecoderLayer(nnx.Module):
    """One transformer layer. ``cross_attention``: a cross-attention block over the
    encoder's output between self-attention and the MLP (T5's decoder layers)."""

    def __init__(self, spec: ModelSpec, layer: int, make_linear, mesh, dtype, cross_attention: bool = False):
        self.parallel_residual = spec.parallel_residual
        self.post_norm = spec.post_norm
        self.residual_from_norm = spec.residual_from_norm
        self.fuse_glue = mesh is None  # the fused kernels run on one device (no shard_map)
        if spec.parallel_residual and (spec.post_norm or spec.residual_from_norm):
            raise ValueError("post_norm and residual_from_norm are sequential-residual layouts")
        self.input_norm = Norm.of(spec, dtype=dtype)
        self.attn = Attention(spec, layer, make_linear, mesh, dtype)
        if cross_attention and (spec.parallel_residual or spec.post_norm or spec.residual_from_norm):
            raise ValueError("cross-attention layers are pre-norm sequential-residual layers")
        self.cross_norm = Norm.of(spec, dtype=dtype) if cross_attention else None
        self.cross_attn = CrossAttention(spec, make_linear, mesh) if cross_attention else None
        shared = spec.parallel_residual and spec.shared_input_norm
        self.pre_mlp_norm = None if shared else Norm.of(spec, dtype=dtype)
        self.attn_out_norm = Norm.of(spec, dtype=dtype) if spec.sandwich_norms else None
        self.mlp_out_norm = Norm.of(spec, dtype=dtype) if spec.sandwich_norms else None
        self.mlp = make_mlp(spec, make_linear, dtype, mesh)

    def _mlp(self, h, md):
        out = self.mlp(h, md)
        return out if self.mlp_out_norm is None else self.mlp_out_norm(out)

    def __call__(self, x: Float[Array, "tokens embed"], kv_cache: tuple[KVPages, KVPages] | None, md: StepMetadata, rotary: dict,
                 alibi_slopes: Float[Array, "heads"] | None, relative_bias: RelativeBias | None = None
                 ) -> tuple[Float[Array, "tokens embed"], tuple[KVPages, KVPages] | None]:
        x, pending, kv_cache = self.forward(x, None, kv_cache, md, rotary, alibi_slopes, relative_bias)
        return (x if pending is None else x + pending), kv_cache

    def forward(self, x: Float[Array, "tokens embed"], residual: Float[Array, "tokens embed"] | None, kv_cache: tuple[KVPages, KVPages] | None, md: StepMetadata,
                rotary: dict, alibi_slopes: Float[Array, "heads"] | None, relative_bias: RelativeBias | None = None
                ) -> tuple[Float[Array, "tokens embed"], Float[Array, "tokens embed"] | None, tuple[KVPages, KVPages] | None]:
        """The layer on input x + residual (residual: the previous layer's last branch
        output, not yet added; None: nothing pending). Returns (x, pending, kv_cache) with
        output x + pending (pending None: x is the output). Leaving the last residual add
        to the next layer lets it run inside that layer's norm kernel on GPUs."""
        mode = fused_ops_mode(md) if self.fuse_glue else None
        if self.post_norm:
            x = x if residual is None else x + residual
            h = x
        else:
            x, h = self.input_norm.add_and_norm(x, residual, mode)
        attn_out, new_cache = self.attn(h, kv_cache, md, rotary, alibi_slopes, relative_bias)
        if self.cross_attn is not None:  # T5: x + self_attn, then + cross_attn, then + MLP
            x = x + attn_out
            attn_out = self.cross_attn(self.cross_norm(x), new_cache, md)
        kv_cache = new_cache
        if self.attn_out_norm is not None:
            attn_out = self.attn_out_norm(attn_out)
        if self.parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x)), or mlp(ln1(x)) with one shared norm.
            mlp_in = h if self.pre_mlp_norm is None else self.pre_mlp_norm(x)
            return x + attn_out + self._mlp(mlp_in, md), None, kv_cache
        if self.post_norm:  # OPT-350m: norm after each residual add
            x = self.input_norm(x + attn_out)
            return self.pre_mlp_norm(x + self._mlp(x, md)), None, kv_cache
        # BLOOM's apply_residual_connection_post_layernorm adds to the normed input instead.
        if self.residual_from_norm:
            x = h + attn_out
            h = self.pre_mlp_norm(x)
            return h + self._mlp(h, md), None, kv_cache
        x, h = self.pre_mlp_norm.add_and_norm(x, attn_out, mode)  # one kernel on GPUs
        return x, self._mlp(h, md), kv_cache


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
        cross = spec.is_encoder_decoder
        self.layers = nnx.List([DecoderLayer(spec, i, make_linear, mesh, dtype, cross_attention=cross)
                                for i in range(spec.num_layers)])
        self.final_norm = Norm.of(spec, dtype=dtype) if spec.final_norm else None
        # T5: one relative-position bias table per stack [buckets, heads], shared by its layers.
        relative = spec.position_type == "relative"
        self.relative_bias = param((spec.relative_num_buckets, spec.num_heads), dtype, (None, "heads")) \
            if relative else None
        # Encoder-decoder: the encoder is the same layer kind, run without a cache (bidirectional).
        if cross:
            self.encoder_layers = nnx.List([DecoderLayer(spec, i, make_linear, mesh, dtype)
                                            for i in range(spec.num_encoder_layers)])
            self.encoder_final_norm = Norm.of(spec, dtype=dtype)
            self.encoder_relative_bias = param((spec.relative_num_buckets, spec.num_heads), dtype,
                                               (None, "heads")) if relative else None
        else:
            self.encoder_layers = self.encoder_final_norm = self.encoder_relative_bias = None
        self.lm_head = (None if spec.tie_word_embeddings else
                        make_linear(LinearSpec("lm_head", embed_size, (spec.vocab_size,),
                                               ("embed", "vocab"), use_bias=spec.lm_head_bias)))

    def __call__(self, token_ids: Int[Array, "tokens"], kv_caches: list | None, md: StepMetadata
                 ) -> tuple[Float[Array, "tokens embed"], list]:
        """The step's tokens -> (hidden states, updated kv_caches: one (K, V) pages per layer)."""
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
        relative_bias = self._relative_bias(self.relative_bias, bidirectional=False)
        new_caches, pending = [], None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, pending, kv_cache = layer.forward(x, pending, kv_cache, md, rotary, alibi_slopes, relative_bias)
            new_caches.append(kv_cache)
        if self.final_norm is not None:
            mode = fused_ops_mode(md) if self.layers[0].fuse_glue else None
            x = self.final_norm.add_and_norm(x, pending, mode)[1]
        elif pending is not None:
            x = x + pending
        if self.project_out is not None:
            x = self.project_out(x, md)
        return x, new_caches

    def _relative_bias(self, table, *, bidirectional: bool):
        if table is None:
            return None
        return RelativeBias(table[...].astype(jnp.float32).T, self.spec.relative_num_buckets,
                            self.spec.relative_max_distance, bidirectional)

    def encode(self, token_ids: Int[Array, "tokens"], kv_caches: list, md: StepMetadata) -> list:
        """Encoder-decoder models: the encoder over token_ids [E] (tokens of several prompts;
        ``md``: positions within each prompt, token_seq_ids -1 for padding, slot_mapping the
        cross blocks of each token), then every decoder layer's cross-attention K/V written
        into its paged cache at md.slot_mapping. Returns the updated kv_caches."""
        with _matmul_precision(self.dtype):
            x = self.embed(token_ids).astype(self.dtype)
            relative_bias = self._relative_bias(self.encoder_relative_bias, bidirectional=True)
            for layer in self.encoder_layers:
                x, _ = layer(x, None, md, {}, None, relative_bias)
            x = self.encoder_final_norm(x)
            return [layer.cross_attn.write(x, kv_cache, md) for layer, kv_cache in zip(self.layers, kv_caches)]

    def logits(self, hidden: Float[Array, "rows embed"], md: StepMetadata | None = None
               ) -> Float32[Array, "rows vocab"]:
        """Float32 logits of each row of hidden states."""
        if self.spec.head_input_scale is not None:
            hidden = hidden * jnp.asarray(self.spec.head_input_scale, hidden.dtype)
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

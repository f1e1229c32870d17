"""The normalized model spec: one description of a decoder-only transformer built
from an HF ``config.json`` by its family's builder (``families/``). Architectures
differ in their spec and weight map, never in copies of the model code."""

from __future__ import annotations

import dataclasses
from typing import Any


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one lmidist-jax can run."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int

    # Normalization: "rms" or "layer" (with a bias unless norm_bias is False); Gemma
    # scales by (1 + w).
    norm_type: str = "rms"
    norm_eps: float = 1e-6
    norm_scale_plus_one: bool = False
    norm_bias: bool = True
    # False: norms without any learned scale or bias (OPT layer_norm_elementwise_affine=false).
    norm_affine: bool = True
    # Per-head norm of q and k before rotary ("rms" Gemma 3, "layer" Phi), or None.
    qk_norm: str | None = None
    # False: qk_norm normalizes all of q (all heads together) and all of k instead of each
    # head (MPT qk_ln: LayerNorm over n_heads * head_dim).
    qk_norm_per_head: bool = True
    # Gemma 2/3: norms on the attention and MLP outputs too (before the residual add).
    sandwich_norms: bool = False
    # BLOOM: a norm on the token embeddings (word_embeddings_layernorm).
    embedding_norm: bool = False
    # OPT-350m post-LN layers: x = norm1(x + attn(x)); x = norm2(x + mlp(x)) (input_norm
    # and pre_mlp_norm applied after each residual add instead of before each block).
    post_norm: bool = False
    # BLOOM apply_residual_connection_post_layernorm: each residual is the block's normed
    # input instead of its input.
    residual_from_norm: bool = False
    # False: no norm after the last layer (OPT-350m, OPT _remove_final_layer_norm).
    final_norm: bool = True

    # Positions: "rope" | "alibi" | "learned" | "relative" (T5: a learned bias per head and
    # bucket of key - query position, computed once per stack and shared by its layers) | "none".
    position_type: str = "rope"
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # < head_dim for partial rotary (GPT-NeoX, Phi)
    rope_interleaved: bool = False  # GPT-J style pairs (x0,x1),(x2,x3)...
    rope_scaling: dict[str, Any] | None = None
    # Gemma 3: sliding-window layers use their own base and no scaling.
    rope_local_theta: float | None = None
    # Learned absolute positions (GPT-2, StarCoder, OPT): row = position + offset (OPT: 2).
    position_offset: int = 0
    # Relative positions (T5): buckets and the distance beyond which they all coincide.
    relative_num_buckets: int = 32
    relative_max_distance: int = 128

    # Encoder-decoder (T5): an encoder of this many layers (the same layer kind, with
    # bidirectional attention and no cache) runs once over the prompt; every decoder layer
    # then has a cross-attention block over the encoder's output. 0: decoder-only.
    num_encoder_layers: int = 0
    # The decoder's first input token (T5: the pad token).
    decoder_start_token_id: int | None = None

    # Attention.
    # How the checkpoint packs q/k/v when one family has several packings
    # (``weight_map.split_qkv`` layouts); None when the family's map knows.
    fused_qkv_layout: str | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    # Per layer "full" or "sliding" (Gemma 2/3 alternation); None: every layer uses
    # sliding_window (which may be None).
    layer_types: tuple[str, ...] | None = None
    # DeciLM (variable GQA): the KV-head count of each layer; None: num_kv_heads everywhere.
    # num_kv_heads is then the largest of them. Each layer's KV cache has its own head count.
    kv_heads_per_layer: tuple[int, ...] | None = None
    attn_logit_softcap: float | None = None
    # MPT clip_qkv: q, k and v clamped to [-clip_qkv, clip_qkv] right after their projection.
    clip_qkv: float | None = None
    query_scale: float | None = None  # default head_dim ** -0.5
    # GPT-2 (scale_attn_by_inverse_layer_idx): layer i also divides its scores by i + 1.
    scale_by_inverse_layer: bool = False

    # MLP: "gated" (act(gate) * up) or "plain" (act(up)); activation name.
    mlp_type: str = "gated"
    activation: str = "silu"
    mlp_bias: bool = False

    # Residual layout: sequential (attn then MLP) or parallel (GPT-J / NeoX / Falcon /
    # Phi). With shared_input_norm the MLP reads the attention's input norm (one norm
    # per layer: GPT-J, Phi, Falcon-7B); otherwise it has its own (NeoX, Falcon-40B).
    parallel_residual: bool = False
    shared_input_norm: bool = False

    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    embedding_multiplier: float | None = None  # Gemma: sqrt(hidden_size)
    # OPT word_embed_proj_dim != hidden_size: the width of the token embeddings and of the
    # (tied) LM head; project_in / project_out (no bias) map it to and from hidden_size.
    word_embed_size: int | None = None
    final_logit_softcap: float | None = None
    # The final hidden state is multiplied by this before the LM head (T5 v1.0's tied head:
    # d_model ** -0.5).
    head_input_scale: float | None = None

    # Mixture of experts (mlp_type "moe": Mixtral, DBRX, Qwen2-MoE): num_experts gated
    # experts of intermediate_size each; a softmax router picks num_experts_per_token per
    # token (models/moe.py). 0 experts = dense MLP.
    num_experts: int = 0
    num_experts_per_token: int = 0
    # The chosen top-k weights are divided by their p-norm with this p: 1 renormalizes
    # them to sum 1 (Mixtral; Qwen2-MoE norm_topk_prob; DBRX moe_normalize_expert_weights);
    # None keeps them as the softmax probabilities.
    moe_weight_norm: float | None = 1.0
    # Qwen2-MoE: a shared gated expert of this size on every token, scaled by
    # sigmoid(x . shared_expert_gate). 0: none.
    shared_expert_size: int = 0
    # How the experts run (pallas_kernels.grouped_matmul.MOE_IMPLS): "auto" picks dense
    # over experts on CPU and the measured-fastest grouped matmul per shape on a GPU.
    moe_impl: str = "auto"

    # ALiBi slopes are multiplied by this (Falcon adds ALiBi before its 1/sqrt(d) scale).
    alibi_scale: float = 1.0
    # ALiBi slopes 2^(-alibi_bias_max * k / n') (MPT's gen_slopes, see decoder.alibi_slopes_for);
    # 8 gives the standard (Press et al.) slopes of BLOOM, Falcon and Baichuan for any head count.
    alibi_bias_max: float = 8.0

    # Projection kind (linear.LINEAR_KINDS): "dense"; quantized kinds later.
    linear_kind: str = "dense"

    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def is_encoder_decoder(self) -> bool:
        return self.num_encoder_layers > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5

    def layer_kv_heads(self, layer: int) -> int:
        """The number of KV heads of ``layer`` (its KV cache's first dimension)."""
        return self.num_kv_heads if self.kv_heads_per_layer is None else self.kv_heads_per_layer[layer]

    @property
    def total_kv_heads(self) -> int:
        """KV heads summed over the layers (what one cached token costs, per head_dim)."""
        return sum(self.layer_kv_heads(i) for i in range(self.num_layers))

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` (None: full attention)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    def layer_scale(self, layer: int) -> float:
        """The attention score scale of ``layer``."""
        return self.scale / (layer + 1) if self.scale_by_inverse_layer else self.scale

    def layer_rope(self, layer: int) -> str:
        """Which rotary table ``layer`` uses: "global", or "local" (Gemma 3 sliding layers)."""
        if self.rope_local_theta is not None and self.layer_window(layer) is not None:
            return "local"
        return "global"

    @property
    def max_model_len(self) -> int:
        """Longest context the model supports, including rope scaling."""
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type in ("linear", "dynamic", "yarn") and "original_max_position_embeddings" not in scaling:
            return int(self.max_position_embeddings * float(scaling.get("factor", 1.0)))
        if rope_type == "yarn":
            return int(scaling["original_max_position_embeddings"] * float(scaling.get("factor", 1.0)))
        return self.max_position_embeddings


def eos_ids(config: dict) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def rope_config(config: dict) -> tuple[float, dict | None]:
    """Rope theta and scaling from either the classic (rope_theta/rope_scaling) or the
    transformers-5 (rope_parameters) config layout."""
    params = config.get("rope_parameters")
    theta = config.get("rope_theta")
    scaling = config.get("rope_scaling")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = dict(params)
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type in (None, "default"):
            scaling = None
        else:
            scaling["rope_type"] = rope_type
    return float(theta if theta is not None else 10000.0), scaling

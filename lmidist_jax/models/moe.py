"""The mixture-of-experts MLP kind (``mlp_type="moe"``: Mixtral, DBRX, Qwen2-MoE).

A softmax router picks ``num_experts_per_token`` gated experts per token; the token's
output is the weighted sum of theirs. Experts are stored stacked: ``w_gate_up``
[E, embed, 2, mlp] and ``w_down`` [E, mlp, embed], sharded over ``mlp`` (every device
holds a slice of every expert: tensor parallelism by the inner dimension, one psum per
layer as for a dense MLP). The router [embed, E] is replicated.

Two ways to run the experts (``spec.moe_impl``; ``resolve_impl``):
  "dense"   every token through every expert, combined with the routing weights (zero
            for the experts not chosen). Plain XLA, exact: the CPU path.
  grouped   the (token, choice) pairs sorted by expert, then two grouped matmuls
            (pallas_kernels.grouped_matmul: "ragged_dot", "mosaic_gpu", "pallas" or the
            "xla" reference). Padding tokens of the step (KV slot 0, the trash block)
            are routed nowhere: they read no expert and come out as zeros.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Float32, Int32
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels.grouped_matmul import GROUPED_MATMUL_IMPLS, grouped_matmul

from ..parallel import TP_AXIS
from .layers import GatedMLP, activation_fn
from .linear import FusedLayout, LinearSpec, param
from .step_metadata import StepMetadata

MOE_IMPLS = ("auto", "dense") + GROUPED_MATMUL_IMPLS

def expert_gate_up_layout(inner: int) -> FusedLayout:
    """One expert's gate/up kernel [embed, 2, mlp]: checkpoint parts gate and up (as GatedMLP)."""
    return FusedLayout(axis=0, parts=(("gate", (1, inner)), ("up", (1, inner))))


def route(router_logits: Float[Array, "tokens experts"], top_k: int, weight_norm: float | None
          ) -> tuple[Float32[Array, "tokens choices"], Int32[Array, "tokens choices"]]:
    """Softmax over all experts in float32, top-k, then (``weight_norm`` p) the chosen
    weights divided by their p-norm: the weights and experts of each token's
    ``top_k`` choices.

    Ties: ``lax.top_k`` keeps the lowest expert index first. torch.topk on a CPU breaks
    exact ties in an implementation-defined order, so when tied experts straddle the
    k-th place the choice may differ from transformers' (the weights are equal; which
    experts run differs). Exact ties need identical router logits: padding, zeros.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if weight_norm is not None:
        p = float(weight_norm)
        if p == 1.0:  # softmax weights are positive: the 1-norm is their sum (Mixtral)
            norm = jnp.sum(weights, axis=-1, keepdims=True)
        else:
            norm = jnp.sum(jnp.abs(weights) ** p, axis=-1, keepdims=True) ** (1.0 / p)
        weights = weights / norm
    return weights, experts.astype(jnp.int32)


def token_mask(md, num_tokens: int):
    """[T] bool: the token is real. Padding tokens of a step write KV slot 0 (the trash
    block 0); real tokens never do (their blocks are >= 1)."""
    if md is None or getattr(md, "slot_mapping", None) is None:
        return jnp.ones((num_tokens,), bool)
    return md.slot_mapping > 0


def resolve_impl(requested: str, num_rows: int, *, platform_backend: str, dtype=jnp.bfloat16,
                 shape: tuple[int, int] | None = None) -> str:
    """The implementation to run for ``num_rows`` (token, expert) pairs. ``platform_backend``
    is the step's attention backend: "xla" on a CPU, a Pallas backend on a GPU; ``shape``
    (embed, mlp) says whether the Mosaic GPU kernel's tiling fits.

    "auto": "dense" on CPU. On a GPU, what measured fastest at Mixtral-8x7B expert shapes
    on an H200 inside one jitted loop (benchmarks/moe.py, 2026-11-30, gate/up + down ms,
    moe-kernels-*.json): the Pallas kernel up to AUTO_PALLAS_MAX_ROWS rows (1 token: 0.14 +
    0.08 vs ragged_dot 0.45 + 0.24, which reads every expert); jax.lax.ragged_dot up to
    AUTO_RAGGED_MAX_ROWS (8 tokens: 0.45 + 0.25 vs Pallas 0.47 + 0.25, Mosaic 0.56 + 0.29;
    64 tokens: 0.47 + 0.26 vs Mosaic 0.52 + 0.30); beyond, Mosaic GPU's ragged_dot in
    bf16/fp16 (512 tokens: 0.93 + 0.48 vs ragged_dot 2.45 + 1.28; 4096: 5.5 + 2.7 vs 19.6
    + 9.6), ragged_dot otherwise. Between 128 and 1024 rows the crossover is not measured.
    """
    if requested not in MOE_IMPLS:
        raise ValueError(f"unknown moe_impl {requested!r}; expected one of {', '.join(MOE_IMPLS)}")
    if requested != "auto":
        return requested
    if platform_backend == "xla":
        return "dense"
    if num_rows <= AUTO_PALLAS_MAX_ROWS:
        return "pallas"
    mosaic_fits = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and shape is not None
                   and all(d % 128 == 0 for d in shape))
    return "mosaic_gpu" if num_rows > AUTO_RAGGED_MAX_ROWS and mosaic_fits else "ragged_dot"


# "auto" on a GPU: the Pallas kernel up to this many (token, expert) rows, ragged_dot up
# to AUTO_RAGGED_MAX_ROWS, then the Mosaic GPU kernel (see resolve_impl).
AUTO_PALLAS_MAX_ROWS = 8
AUTO_RAGGED_MAX_ROWS = 128


def dense_experts(x: Float[Array, "tokens embed"], weights: Float32[Array, "tokens choices"],
                  experts: Int32[Array, "tokens choices"], valid: Bool[Array, "tokens"],
                  w_gate_up: Float[Array, "experts embed 2 mlp"], w_down: Float[Array, "experts mlp embed"],
                  act) -> Float32[Array, "tokens embed"]:
    """Every token through every expert; the choices combined by their weights.
    x [T, embed], weights/experts [T, k], w_gate_up [E, embed, 2, mlp], w_down [E, mlp, embed]
    -> [T, embed] float32 (a partial sum when the mlp axis is a shard)."""
    num_experts = w_gate_up.shape[0]
    precision = _precision(x.dtype)
    # combine[t, e]: the weight of expert e for token t (repeated choices add up).
    combine = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)
    combine = jnp.where(valid[:, None], combine, 0.0)
    h = jnp.einsum("th,ehci->teci", x, w_gate_up.astype(x.dtype), precision=precision)
    inner = act(h[:, :, 0]) * h[:, :, 1]  # [T, E, mlp]
    y = jnp.einsum("tei,eih->teh", inner, w_down.astype(x.dtype), precision=precision)
    return jnp.einsum("te,teh->th", combine, y.astype(jnp.float32), precision=precision)


def grouped_experts(x: Float[Array, "tokens embed"], weights: Float32[Array, "tokens choices"],
                    experts: Int32[Array, "tokens choices"], valid: Bool[Array, "tokens"],
                    w_gate_up: Float[Array, "experts embed 2 mlp"], w_down: Float[Array, "experts mlp embed"],
                    act, impl: str, interpret: bool = False) -> Float32[Array, "tokens embed"]:
    """The (token, choice) pairs sorted by expert through two grouped matmuls; same
    contract as ``dense_experts``. Padding tokens sort last, outside every group."""
    num_tokens = experts.shape[0]
    num_experts, embed = w_gate_up.shape[:2]
    order, row_token, group_sizes = sort_by_expert(experts, valid, num_experts)
    rows = jnp.take(x, row_token, axis=0)  # [T*k, embed], grouped by expert
    # Gate and up of each expert as one [embed, 2 * mlp] matrix of the grouped matmul.
    h = grouped_matmul(rows, rearrange(w_gate_up, "e h c i -> e h (c i)"), group_sizes, impl=impl,
                       interpret=interpret)
    h = rearrange(h, "r (c i) -> r c i", c=2)
    y = grouped_matmul(act(h[:, 0]) * h[:, 1], w_down, group_sizes, impl=impl, interpret=interpret)
    grouped = jnp.arange(order.shape[0]) < jnp.sum(group_sizes)
    row_weight = jnp.where(grouped, rearrange(weights, "t k -> (t k)")[order], 0.0)
    contrib = jnp.where(grouped[:, None], y.astype(jnp.float32) * row_weight[:, None], 0.0)
    return jnp.zeros((num_tokens, embed), jnp.float32).at[row_token].add(contrib)


def sort_by_expert(experts: Int32[Array, "tokens choices"], valid: Bool[Array, "tokens"], num_experts: int
                   ) -> tuple[Int32[Array, "tokens*choices"], Int32[Array, "tokens*choices"], Int32[Array, "experts"]]:
    """The (token, choice) pairs grouped by expert. experts [T, k], valid [T] ->
    (order [T*k]: pair indices sorted by expert, padding tokens' pairs last;
    row_token [T*k]: the token of each sorted pair; group_sizes [E]: pairs per expert,
    padding not counted, so a padding token reads no expert)."""
    top_k = experts.shape[1]
    # Pair p = (token p // k, choice p % k); expert E = nowhere.
    row_expert = rearrange(jnp.where(valid[:, None], experts, num_experts), "t k -> (t k)")
    order = jnp.argsort(row_expert, stable=True)
    group_sizes = jnp.sum(jax.nn.one_hot(row_expert, num_experts, dtype=jnp.int32), axis=0)
    return order, order // top_k, group_sizes


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class MoEMLP(nnx.Module):
    """Router + stacked gated experts (+ Qwen2-MoE's gated shared expert)."""

    def __init__(self, spec, make_linear, *, dtype=None, mesh: Mesh | None = None):
        num_experts, top_k = spec.num_experts, spec.num_experts_per_token
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"a mixture of experts needs num_experts >= 1 and 1 <= num_experts_per_token <= "
                             f"num_experts; got {num_experts} experts, {top_k} per token")
        if spec.moe_impl not in MOE_IMPLS:
            raise ValueError(f"unknown moe_impl {spec.moe_impl!r}; expected one of {', '.join(MOE_IMPLS)}")
        embed, inner = spec.hidden_size, spec.intermediate_size
        self.top_k = top_k
        self.weight_norm = spec.moe_weight_norm
        self.impl = spec.moe_impl
        self.act = activation_fn(spec.activation)
        self.router = make_linear(LinearSpec("router", embed, (num_experts,), ("embed", None)))
        self.w_gate_up = param((num_experts, embed, 2, inner), dtype, ("experts", "embed", None, "mlp"),
                               experts=num_experts, expert_layout=expert_gate_up_layout(inner))
        self.w_down = param((num_experts, inner, embed), dtype, ("experts", "mlp", "embed"), experts=num_experts)
        tp = 1 if mesh is None else mesh.shape[TP_AXIS]
        # Shard-local experts (shard_map) when the mlp axis splits evenly; otherwise the
        # weights are replicated (parallel.partition_spec) and every device runs them whole.
        self.mesh = mesh if tp > 1 and inner % tp == 0 else None
        if spec.shared_expert_size:
            shared = dataclasses.replace(spec, intermediate_size=spec.shared_expert_size, mlp_bias=False)
            self.shared_expert = GatedMLP(shared, make_linear, dtype=dtype)
            self.shared_expert_gate = make_linear(LinearSpec("shared_expert_gate", embed, (1,), ("embed", None)))
        else:
            self.shared_expert = self.shared_expert_gate = None

    def __call__(self, x: Float[Array, "tokens embed"], md: StepMetadata | None) -> Float[Array, "tokens embed"]:
        num_tokens = x.shape[0]
        logits = self.router(x, md)  # [T, E] in the model dtype, as transformers
        weights, experts = route(logits, self.top_k, self.weight_norm)
        valid = token_mask(md, num_tokens)
        backend = getattr(md, "backend", "xla") if md is not None else "xla"
        w_gate_up, w_down = self.w_gate_up[...], self.w_down[...]
        impl = resolve_impl(self.impl, num_tokens * self.top_k, platform_backend=backend, dtype=x.dtype,
                            shape=(w_gate_up.shape[1], w_down.shape[1] // (1 if self.mesh is None else
                                                                          self.mesh.shape[TP_AXIS])))
        # A Pallas kernel asked for on a CPU runs in interpret mode (tests; slow).
        run = (functools.partial(dense_experts, act=self.act) if impl == "dense" else
               functools.partial(grouped_experts, act=self.act, impl=impl, interpret=backend == "xla"))
        if self.mesh is None:
            out = run(x, weights, experts, valid, w_gate_up, w_down)
        else:
            def local(x, weights, experts, valid, w_gate_up, w_down):
                return jax.lax.psum(run(x, weights, experts, valid, w_gate_up, w_down), TP_AXIS)

            out = jax.shard_map(local, mesh=self.mesh,
                                in_specs=(P(), P(), P(), P(), P(None, None, None, TP_AXIS), P(None, TP_AXIS, None)),
                                out_specs=P(), check_vma=False)(x, weights, experts, valid, w_gate_up, w_down)
        out = out.astype(x.dtype)
        if self.shared_expert is not None:
            gate = jax.nn.sigmoid(self.shared_expert_gate(x, md).astype(jnp.float32))
            out = out + (gate * self.shared_expert(x, md).astype(jnp.float32)).astype(x.dtype)
        return out

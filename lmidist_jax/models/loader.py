"""Builds a model: the NNX graph from its spec, and its parameters from a checkpoint
(or random, for benchmarks at real sizes) placed straight onto the mesh."""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import parallel
from .decoder import DecoderModel
from .spec import ModelSpec

DTYPES = {"fp32": jnp.float32, "fp16": jnp.float16, "bf16": jnp.bfloat16}


@dataclasses.dataclass
class LoadedModel:
    spec: ModelSpec
    graphdef: nnx.GraphDef
    state: nnx.State  # parameters, placed on the mesh
    dtype: jnp.dtype
    mesh: Mesh
    # The checkpoint's own spec (differs from `spec` when KV heads were replicated for TP).
    source_spec: ModelSpec | None = None

    def __post_init__(self):
        if self.source_spec is None:
            self.source_spec = self.spec

    @property
    def num_parameter_bytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self.state))

    def module(self) -> DecoderModel:
        return nnx.merge(self.graphdef, self.state)


def abstract_model(spec: ModelSpec, dtype, max_model_len: int | None = None):
    model = nnx.eval_shape(lambda: DecoderModel(spec, dtype=dtype, max_model_len=max_model_len))
    return nnx.split(model)


def _variables(state) -> dict[tuple, nnx.Variable]:
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): var for path, var in leaves}


def spec_for_mesh(spec: ModelSpec, tp: int) -> ModelSpec:
    """The spec the sharded model runs: with more TP devices than KV heads (MQA/GQA),
    each KV head is replicated so that every device holds the one its queries need."""
    if spec.num_heads % tp:
        raise ValueError(f"tensor_parallel_degree={tp} does not divide the model's "
                         f"{spec.num_heads} attention heads")
    if spec.num_kv_heads % tp == 0:
        return spec
    if tp % spec.num_kv_heads:
        raise ValueError(f"tensor_parallel_degree={tp} neither divides nor is a multiple of the "
                         f"model's {spec.num_kv_heads} KV heads")
    return dataclasses.replace(spec, num_kv_heads=tp)


def _replicate_kv_heads(array: np.ndarray, original: ModelSpec, target: ModelSpec, axis: int) -> np.ndarray:
    """k/v projection with its ``axis`` of kv_heads * head_dim (the last for [in, out] and
    biases, 0 for a checkpoint's [out, in]) repeated per head: kv head j becomes heads
    j*r .. j*r+r-1."""
    r = target.num_kv_heads // original.num_kv_heads
    axis %= array.ndim
    before, after = array.shape[:axis], array.shape[axis + 1:]
    heads = array.reshape(*before, original.num_kv_heads, original.head_dim, *after)
    return np.repeat(heads, r, axis=axis).reshape(*before, target.num_kv_heads * original.head_dim, *after)


def _place(array, sharding, dtype) -> jax.Array:
    """Host tensor -> array on the mesh in ``dtype``. Each device receives only its own
    shard (also across hosts); dtype casts and ``Transposed`` matrices are done on the
    devices, shard by shard (the source is placed with the transposed sharding, so the
    transpose is local)."""
    from converters.weight_maps import Transposed

    transpose = isinstance(array, Transposed)
    host = np.asarray(array.array if transpose else array)
    source_sharding = sharding
    if transpose:
        spec = tuple(sharding.spec) + (None,) * (host.ndim - len(sharding.spec))
        source_sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[::-1]))
    placed = jax.make_array_from_callback(host.shape, source_sharding, lambda index: host[index])
    if transpose or placed.dtype != jnp.dtype(dtype):
        placed = _transpose_cast(placed, jnp.dtype(dtype), sharding, transpose)
    return placed


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _transpose_cast(x, dtype, sharding, transpose: bool):
    return jax.lax.with_sharding_constraint((x.T if transpose else x).astype(dtype), sharding)


def load_model(spec: ModelSpec, tensors: Iterable[tuple[tuple, np.ndarray]], *, dtype, mesh: Mesh,
               max_model_len: int | None = None) -> LoadedModel:
    """Places each mapped checkpoint tensor on the mesh as it arrives (host memory holds
    one tensor at a time beyond what is already on the devices)."""
    original = spec
    spec = spec_for_mesh(spec, mesh.shape[parallel.TP_AXIS])
    graphdef, state = abstract_model(spec, dtype, max_model_len)
    variables = _variables(state)
    filled = set()
    from converters.weight_maps import Transposed

    for path, array in tensors:
        if spec is not original and path[-2] in ("k_proj", "v_proj"):
            if isinstance(array, Transposed):  # heads are the leading axis of [out, in]
                array = Transposed(_replicate_kv_heads(np.asarray(array.array), original, spec, axis=0))
            else:
                array = _replicate_kv_heads(np.asarray(array), original, spec, axis=-1)
        if spec.tie_word_embeddings and path == ("lm_head", "kernel"):
            continue  # tied: the embedding serves as the LM head
        var = variables.get(path)
        if var is None:
            raise ValueError(f"checkpoint weight for {'.'.join(map(str, path))} has no place in the model")
        if tuple(array.shape) != tuple(var.shape):
            raise ValueError(f"checkpoint weight {'.'.join(map(str, path))} has shape {tuple(array.shape)}, "
                             f"the model expects {tuple(var.shape)}")
        sharding = parallel.named_sharding(var.get_metadata()["logical_axes"], var.shape, mesh)
        var.set_value(_place(array, sharding, var.dtype))
        filled.add(path)
    missing = sorted(set(variables) - filled)
    if missing:
        shown = ", ".join(".".join(map(str, p)) for p in missing[:8])
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {shown}")
    return LoadedModel(spec, graphdef, state, dtype, mesh, source_spec=original)


def random_model(spec: ModelSpec, *, dtype, mesh: Mesh, seed: int = 0,
                 max_model_len: int | None = None) -> LoadedModel:
    """Random weights of the right shapes, generated on the devices (no host copy): for
    benchmarks of real-size models without their checkpoints."""
    original = spec
    spec = spec_for_mesh(spec, mesh.shape[parallel.TP_AXIS])
    graphdef, state = abstract_model(spec, dtype, max_model_len)
    key = jax.random.key(seed)
    # One compiled initializer per distinct (shape, dtype, placement): a 32-layer model
    # has a handful, not one per weight.
    initializers = {}
    for i, (path, var) in enumerate(sorted(_variables(state).items(), key=lambda kv: str(kv[0]))):
        sharding = parallel.named_sharding(var.get_metadata()["logical_axes"], var.shape, mesh)
        is_norm = path[-1] == "scale"
        cache_key = (tuple(var.shape), jnp.dtype(var.dtype).name, sharding.spec, is_norm)
        if cache_key not in initializers:
            initializers[cache_key] = jax.jit(
                lambda k, shape=var.shape, dt=var.dtype, norm=is_norm: (
                    jnp.ones(shape, dt) if norm else (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dt)),
                out_shardings=sharding)
        var.set_value(initializers[cache_key](jax.random.fold_in(key, i)))
    return LoadedModel(spec, graphdef, state, dtype, mesh, source_spec=original)

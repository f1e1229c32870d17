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
from .linear import FusedLayout, assemble_fused, split_fused
from .spec import ModelSpec
from .weight_map import Expert, Part, Transposed


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


def abstract_model(spec: ModelSpec, dtype, max_model_len: int | None = None, mesh: Mesh | None = None):
    model = nnx.eval_shape(lambda: DecoderModel(spec, dtype=dtype, max_model_len=max_model_len, mesh=mesh))
    return nnx.split(model)


def variables(state) -> dict[tuple, nnx.Variable]:
    """Parameter path -> variable of a model state."""
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): var for path, var in leaves}


def spec_for_mesh(spec: ModelSpec, tp: int) -> ModelSpec:
    """The spec the sharded model runs: with more TP devices than KV heads (MQA/GQA),
    each KV head is replicated so that every device holds the one its queries need."""
    if spec.num_heads % tp:
        raise ValueError(f"tensor_parallel_degree={tp} does not divide the model's "
                         f"{spec.num_heads} attention heads")

    def fit(kv_heads: int) -> int:
        if kv_heads % tp == 0:
            return kv_heads
        if tp % kv_heads:
            raise ValueError(f"tensor_parallel_degree={tp} neither divides nor is a multiple of the "
                             f"model's {kv_heads} KV heads")
        return tp

    if spec.kv_heads_per_layer is not None:  # DeciLM: each layer on its own
        per_layer = tuple(fit(k) for k in spec.kv_heads_per_layer)
        if per_layer == spec.kv_heads_per_layer:
            return spec
        return dataclasses.replace(spec, kv_heads_per_layer=per_layer, num_kv_heads=max(per_layer))
    kv_heads = fit(spec.num_kv_heads)
    return spec if kv_heads == spec.num_kv_heads else dataclasses.replace(spec, num_kv_heads=kv_heads)


def param_sharding(var, mesh: Mesh) -> NamedSharding:
    """Where a parameter lives on the mesh (its logical axes through the sharding rules)."""
    return parallel.named_sharding(var.get_metadata()["logical_axes"], var.shape, mesh)


def _place(array, sharding, dtype) -> jax.Array:
    """Host tensor -> array on the mesh in ``dtype``. Each device receives only its own
    shard (also across hosts); dtype casts and ``Transposed`` matrices are done on the
    devices, shard by shard (the source is placed with the transposed sharding, so the
    transpose is local)."""
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


def _lead(var) -> int:
    """Number of input dims of a fused parameter (1 for a kernel, 0 for a bias)."""
    return var.ndim - len(var.get_metadata()["fused"].parts[0][1])


def _part_sharding(var, part_size: int, mesh: Mesh) -> NamedSharding:
    """Placement of one checkpoint part ([in, n] or [n], flat along the output) of a
    fused parameter: split like the parameter when the parameter's sharded output dim
    comes first in the part (then each device receives only what it keeps), else
    replicated (replicated KV heads; a mesh of one)."""
    layout: FusedLayout = var.get_metadata()["fused"]
    lead = _lead(var)
    target = tuple(parallel.partition_spec(var.get_metadata()["logical_axes"], var.shape, mesh))
    out_spec = (target + (None,) * var.ndim)[lead:var.ndim]
    dims = layout.parts[0][1]
    sharded = [j for j, axis in enumerate(out_spec) if axis is not None]
    if (len(sharded) == 1 and all(d == 1 for d in dims[:sharded[0]])
            and part_size % mesh.shape[out_spec[sharded[0]]] == 0):
        return NamedSharding(mesh, PartitionSpec(*((None,) * lead + (out_spec[sharded[0]],))))
    return NamedSharding(mesh, PartitionSpec())


def _place_part(array, sharding: NamedSharding) -> jax.Array:
    """A part on the mesh as the checkpoint stores it (a ``Transposed`` part stays
    [n, in], placed with the flipped sharding; the assembly transposes it)."""
    host = np.asarray(array.array if isinstance(array, Transposed) else array)
    if isinstance(array, Transposed):
        spec = tuple(sharding.spec) + (None,) * (host.ndim - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec[::-1]))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _assemble_on_devices(parts, layout, lead, transposed, dtype, sharding):
    parts = {slot: (a.T if slot in transposed else a).astype(dtype) for slot, a in parts.items()}
    return jax.lax.with_sharding_constraint(assemble_fused(parts, layout, lead), sharding)


def _assemble(var, parts: dict, mesh: Mesh) -> jax.Array:
    """Place each checkpoint part, then build the fused parameter on the devices."""
    placed = {slot: _place_part(a, _part_sharding(var, a.shape[-1], mesh)) for slot, a in parts.items()}
    transposed = tuple(sorted(slot for slot, a in parts.items() if isinstance(a, Transposed)))
    return _assemble_on_devices(placed, var.get_metadata()["fused"], _lead(var), transposed,
                                jnp.dtype(var.dtype), param_sharding(var, mesh))


def _path_name(path) -> str:
    return ".".join(map(str, path))


def load_model(spec: ModelSpec, tensors: Iterable[tuple[tuple, object]], *, dtype, mesh: Mesh,
               max_model_len: int | None = None) -> LoadedModel:
    """Places each mapped checkpoint tensor on the mesh as it arrives. ``tensors`` yields
    (parameter path, value): an array in our layout, a ``Transposed`` one, or a ``Part``
    of a fused parameter (held on the host until the parameter's other parts arrive)."""
    original = spec
    spec = spec_for_mesh(spec, mesh.shape[parallel.TP_AXIS])
    graphdef, state = abstract_model(spec, dtype, max_model_len, mesh)
    params = variables(state)
    filled, pending, experts_placed = set(), {}, {}
    for path, value in tensors:
        if spec.tie_word_embeddings and path[0] == "lm_head":
            continue  # tied: the embedding serves as the LM head
        var = params.get(path)
        if var is None:
            raise ValueError(f"checkpoint weight for {_path_name(path)} has no place in the model")
        if path in filled:
            raise ValueError(f"the checkpoint holds {_path_name(path)} twice")
        if isinstance(value, Expert):  # one expert's slice of a parameter stacked over experts
            if _add_expert(var, path, value, experts_placed.setdefault(path, {}), mesh):
                del experts_placed[path]
                filled.add(path)
            continue
        layout = var.get_metadata().get("fused")
        if isinstance(value, Part) or layout is not None:
            if layout is None or not isinstance(value, Part):
                raise ValueError(f"checkpoint weight {_path_name(path)} is not made of named parts here")
            if value.slot not in layout.slots:
                raise ValueError(f"{_path_name(path)} has no part {value.slot!r}; parts: {', '.join(layout.slots)}")
            parts = pending.setdefault(path, {})
            parts[value.slot] = value.array
            if len(parts) < len(layout.slots):
                continue
            del pending[path]
            _check_parts(var, parts, path)
            var.set_value(_assemble(var, parts, mesh))
            filled.add(path)
            continue
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"checkpoint weight {_path_name(path)} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(var.shape)}")
        var.set_value(_place(value, param_sharding(var, mesh), var.dtype))
        filled.add(path)
    for path, placed in experts_placed.items():
        num_experts = params[path].get_metadata()["experts"]
        missing = [str(i) for i in range(num_experts) if not isinstance(placed.get(i), jax.Array)]
        raise ValueError(f"checkpoint is missing expert(s) {', '.join(missing)} (or parts of them) of "
                         f"{_path_name(path)}")
    for path, parts in pending.items():
        missing = [s for s in params[path].get_metadata()["fused"].slots if s not in parts]
        raise ValueError(f"checkpoint is missing the {', '.join(missing)} part(s) of {_path_name(path)}")
    missing = sorted(set(params) - filled)
    if missing:
        shown = ", ".join(_path_name(p) for p in missing[:8])
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {shown}")
    return LoadedModel(spec, graphdef, state, dtype, mesh, source_spec=original)


class _ExpertSlice:
    """One expert's slice of a parameter stacked over experts ([E, ...], metadata
    ``experts`` = E), seen by the placement helpers as a parameter of its own: its shape,
    dtype, logical axes, and its fused layout (metadata ``expert_layout``), if any."""

    def __init__(self, var):
        self.shape = tuple(var.shape[1:])
        self.ndim = len(self.shape)
        self.dtype = var.dtype
        metadata = var.get_metadata()
        self._metadata = {"logical_axes": tuple(metadata["logical_axes"][1:]),
                          "fused": metadata.get("expert_layout")}

    def get_metadata(self) -> dict:
        return self._metadata


def _add_expert(var, path, value: Expert, placed: dict, mesh: Mesh) -> bool:
    """Place one expert's slice (a fused slice once all its parts are in) on the mesh,
    sharded like the stacked parameter, so each device receives only its shard; once
    every expert is placed, stack them on the devices. True when ``var`` is filled."""
    name = _path_name(path)
    num_experts = var.get_metadata().get("experts")
    if not num_experts:
        raise ValueError(f"checkpoint weight {name} is not stacked over experts here")
    if not 0 <= value.index < num_experts:
        raise ValueError(f"checkpoint weight {name} names expert {value.index}; the model has {num_experts}")
    if isinstance(placed.get(value.index), jax.Array):
        raise ValueError(f"the checkpoint holds expert {value.index} of {name} twice")
    view = _ExpertSlice(var)
    layout = view.get_metadata()["fused"]
    if layout is not None:
        if not isinstance(value.value, Part) or value.value.slot not in layout.slots:
            raise ValueError(f"expert {value.index} of {name} is made of the parts {', '.join(layout.slots)}; "
                             f"got {getattr(value.value, 'slot', 'a whole tensor')!r}")
        parts = placed.setdefault(value.index, {})
        if value.value.slot in parts:
            raise ValueError(f"the checkpoint holds part {value.value.slot!r} of expert {value.index} of {name} twice")
        parts[value.value.slot] = value.value.array
        if len(parts) < len(layout.slots):
            return False
        _check_parts(view, parts, path)
        placed[value.index] = _assemble(view, parts, mesh)
    else:
        if isinstance(value.value, Part):
            raise ValueError(f"expert {value.index} of {name} is not made of named parts here")
        if tuple(value.shape) != view.shape:
            raise ValueError(f"expert {value.index} of {name} has shape {tuple(value.shape)}, the model "
                             f"expects {view.shape}")
        placed[value.index] = _place(value.value, param_sharding(view, mesh), var.dtype)
    if len(placed) < num_experts or not all(isinstance(a, jax.Array) for a in placed.values()):
        return False
    var.set_value(_stack_experts(tuple(placed[i] for i in range(num_experts)), param_sharding(var, mesh)))
    return True


@functools.partial(jax.jit, static_argnums=(1,))
def _stack_experts(slices, sharding):
    return jax.lax.with_sharding_constraint(jnp.stack(slices), sharding)


def _check_parts(var, parts, path) -> None:
    """Each part must be [in, n] (or [n]) with n its slot's size, or a divisor of it for a
    replicable slot (KV heads replicated for the mesh)."""
    layout: FusedLayout = var.get_metadata()["fused"]
    lead = _lead(var)
    for slot, dims in layout.parts:
        shape = tuple(parts[slot].shape)
        want_lead = tuple(var.shape[:lead])
        n = shape[-1]
        full = int(np.prod(dims))
        ok = shape[:-1] == want_lead and len(shape) == lead + 1 and (
            n == full or (slot in layout.replicable and n and full % n == 0))
        if not ok:
            raise ValueError(f"checkpoint part {slot!r} of {_path_name(path)} has shape {shape}; the model "
                             f"expects {want_lead + (full,)}")


def to_source_layout(model: LoadedModel) -> dict:
    """The parameters as a nested dict of host arrays in the checkpoint's own head layout
    (KV heads replicated for the mesh are folded back), for saving."""
    pure = nnx.to_pure_dict(model.state)
    if model.spec == model.source_spec:
        return pure
    _, source_state = abstract_model(model.source_spec, model.dtype)
    source_vars = variables(source_state)
    for path, var in variables(model.state).items():
        layout = var.get_metadata().get("fused")
        if layout is None or not layout.replicable:
            continue
        # How many times this parameter's KV heads were replicated (per layer: DeciLM).
        source_layout = source_vars[path].get_metadata()["fused"]
        slot = layout.replicable[0]
        r = int(np.prod(dict(layout.parts)[slot])) // int(np.prod(dict(source_layout.parts)[slot]))
        if r == 1:
            continue
        lead = _lead(var)
        parts = split_fused(np.asarray(var[...]), layout, lead, repeats=r, xp=np)
        node = pure
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = assemble_fused(parts, source_vars[path].get_metadata()["fused"], lead, xp=np)
    return pure


def parts_of(spec: ModelSpec, params: dict[tuple, np.ndarray], dtype) -> Iterable[tuple[tuple, object]]:
    """(path, value) for ``load_model`` from parameters saved in ``spec``'s layout: fused
    ones are split back into their named parts (so they can be re-laid for any mesh)."""
    _, state = abstract_model(spec, dtype)
    source_vars = variables(state)
    for path, value in params.items():
        layout = source_vars[path].get_metadata().get("fused") if path in source_vars else None
        if layout is None:
            yield path, value
            continue
        for slot, part in split_fused(value, layout, _lead(source_vars[path]), xp=np).items():
            yield path, Part(slot, part)


def random_model(spec: ModelSpec, *, dtype, mesh: Mesh, seed: int = 0,
                 max_model_len: int | None = None) -> LoadedModel:
    """Random weights of the right shapes, generated on the devices (no host copy): for
    benchmarks of real-size models without their checkpoints."""
    original = spec
    spec = spec_for_mesh(spec, mesh.shape[parallel.TP_AXIS])
    graphdef, state = abstract_model(spec, dtype, max_model_len, mesh)
    key = jax.random.key(seed)
    # One compiled initializer per distinct (shape, dtype, placement): a 32-layer model
    # has a handful, not one per weight.
    initializers = {}
    for i, (path, var) in enumerate(sorted(variables(state).items(), key=lambda kv: str(kv[0]))):
        sharding = param_sharding(var, mesh)
        is_norm = path[-1] == "scale"
        cache_key = (tuple(var.shape), jnp.dtype(var.dtype).name, sharding.spec, is_norm)
        if cache_key not in initializers:
            initializers[cache_key] = jax.jit(
                lambda k, shape=var.shape, dt=var.dtype, norm=is_norm: (
                    jnp.ones(shape, dt) if norm else (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dt)),
                out_shardings=sharding)
        var.set_value(initializers[cache_key](jax.random.fold_in(key, i)))
    return LoadedModel(spec, graphdef, state, dtype, mesh, source_spec=original)

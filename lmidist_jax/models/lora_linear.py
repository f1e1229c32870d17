"""The LoRA-carrying linear kind: any base kind plus a stacked multi-adapter delta.

Every projection of the model (q/k/v, o, gate/up, up, down; not the LM head) gets
adapter matrices stacked over ``num_slots`` slots (slot 0 = no adapter, zeros):

  lora_a          [S, in, P, R]     one shrink matrix per fused part (P = 1 unfused)
  lora_b / _<p>   [S, R, *dims_p]   one expand matrix per part, laid out like that
                                    part of the kernel (so it shards like the kernel)

Token t uses slot ``md.lora_slots[t]``. A fused projection's delta is built part by
part and concatenated like its kernel, so a LoRA on q only adds into the q part. The
adapters are model state: swapping one is a write into a slot, never a recompilation.

A and B are variables of their own types (``LoraA``, ``LoraB``, both ``LoraParam``), so
fine-tuning selects its trainable state by type (``nnx.split(model, LoraA, LoraB, ...)``).

Under tensor parallelism A takes the kernel's input axis (replicated for a
column-parallel kernel; sharded with the input for a row-parallel one, where XLA sums
the rank-R partial products across devices) and B takes the kernel's output axes.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Float

from pallas_kernels.lora import lora_expand, lora_shrink
from .linear import LINEAR_KINDS, LinearSpec, param
from .step_metadata import StepMetadata

# Roles that carry adapters (lm_head, project_in/out do not).
LORA_ROLES = ("qkv", "o", "gate_up", "up", "down")


class LoraParam(nnx.Param):
    """A LoRA adapter matrix (the base model's weights are plain ``nnx.Param``)."""


class LoraA(LoraParam):
    """The shrink matrices A [S, in, P, R]."""


class LoraB(LoraParam):
    """The expand matrices B [S, R, *dims] (the alpha / r scaling folded in when serving)."""


def lora_parts(spec: LinearSpec) -> tuple[tuple[str | None, tuple[int, ...]], ...]:
    """(part name, dims) of a projection: its fused parts, or one unnamed part."""
    return spec.fused.parts if spec.fused is not None else ((None, spec.out_shape),)


def lora_b_name(part: str | None) -> str:
    return "lora_b" if part is None else f"lora_b_{part}"


class LoraMixin:
    """Adds the stacked adapter delta to a base linear kind (see the module docstring)."""

    __slots__ = ()  # so that a base module's class can be swapped for base + LoraMixin

    def _init_lora(self, spec: LinearSpec, dtype, num_slots: int, max_rank: int):
        self.lora_fused_axis = spec.fused.axis if spec.fused is not None else None
        self.lora_part_names = tuple(p for p, _ in lora_parts(spec))
        num_parts = len(self.lora_part_names)
        self.lora_a = param((num_slots, spec.in_features, num_parts, max_rank), dtype,
                            (None, spec.axes[0], None, None), kind=LoraA, lora=True)
        for part, dims in lora_parts(spec):
            setattr(self, lora_b_name(part), param((num_slots, max_rank, *dims), dtype,
                                                   (None, None, *spec.axes[1:]), kind=LoraB, lora=True))

    def _add_lora(self, y: Float[Array, "tokens *out_shape"], x: Float[Array, "tokens in_features"],
                  md: StepMetadata | None) -> Float[Array, "tokens *out_shape"]:
        """The base output ``y`` plus each token's adapter delta."""
        slots = getattr(md, "lora_slots", None)
        if slots is None:
            return y
        a = self.lora_a[...]                            # [S, in, P, R]
        # Every part's rank-R shrink in one matmul: the parts' A side by side.
        h = lora_shrink(x, rearrange(a, "s i p r -> s i (p r)"), slots)
        h = rearrange(h, "t (p r) -> t p r", p=a.shape[2])
        deltas = []
        for j, part in enumerate(self.lora_part_names):
            b = getattr(self, lora_b_name(part))[...]   # [S, R, *dims]
            d = lora_expand(h[:, j], rearrange(b, "s r ... -> s r (...)"), slots, y.dtype)
            deltas.append(d.reshape(d.shape[:1] + b.shape[2:]))  # back to the part's output dims
        delta = deltas[0] if len(deltas) == 1 else jnp.concatenate(deltas, axis=1 + self.lora_fused_axis)
        return y + delta


_LORA_CLASSES: dict[type, type] = {}
_BASE_KIND: dict[str, str] = {}  # LoRA kind name -> the base kind it wraps


def base_linear_kind(kind: str) -> str:
    """The base kind under a LoRA kind (``kind`` itself when it carries no LoRA)."""
    return _BASE_KIND.get(kind, kind)


def _lora_class(base: type) -> type:
    """``base`` + LoraMixin (same attributes, so the base parameters keep their paths)."""
    cls = _LORA_CLASSES.get(base)
    if cls is None:
        # The base class first: CPython only swaps __class__ between compatible layouts.
        def __call__(self, x, md=None):
            return self._add_lora(base.__call__(self, x, md), x, md)
        cls = _LORA_CLASSES[base] = type(f"Lora{base.__name__}", (base, LoraMixin),
                                         {"__slots__": (), "__call__": __call__})
    return cls


def lora_linear_kind(base_kind: str, num_slots: int, max_rank: int) -> str:
    """Registers (once) and returns the name of the kind "``base_kind`` + LoRA with
    ``num_slots`` slots of rank ``max_rank``" in ``LINEAR_KINDS``. ``base_kind`` may be a
    class or a factory (quantized kinds): its module is built as usual, then given the
    adapter slots."""
    base_kind = base_linear_kind(base_kind)
    name = f"lora{num_slots}x{max_rank}:{base_kind}"
    if name not in LINEAR_KINDS:
        try:
            base = LINEAR_KINDS[base_kind]
        except KeyError:
            raise ValueError(f"unknown linear kind {base_kind!r}; available: "
                             f"{', '.join(sorted(LINEAR_KINDS))}") from None

        def make(spec: LinearSpec, *, dtype):
            module = base(spec, dtype=dtype)
            if spec.role in LORA_ROLES:
                module.__class__ = _lora_class(type(module))
                module._init_lora(spec, dtype, num_slots, max_rank)
            return module
        LINEAR_KINDS[name] = make
        _BASE_KIND[name] = base_kind
    return name


def with_lora(model, num_slots: int, max_rank: int, max_model_len: int | None = None):
    """The loaded model rebuilt with the LoRA kind: the base parameters are the same
    arrays (same paths), the adapter slots zeros on the mesh. ``model`` may itself carry
    LoRA slots (an engine's): only its base parameters are taken. ``max_model_len``: as
    the model was loaded with (its rotary tables depend on it)."""
    import jax

    from .loader import LoadedModel, abstract_model, param_sharding, variables

    kind = lora_linear_kind(model.spec.linear_kind, num_slots, max_rank)
    spec = dataclasses.replace(model.spec, linear_kind=kind)
    source_spec = dataclasses.replace(model.source_spec, linear_kind=kind)
    graphdef, state = abstract_model(spec, model.dtype, max_model_len, model.mesh)
    base_vars = {path: var for path, var in variables(model.state).items() if not isinstance(var, LoraParam)}
    zeros = {}
    for path, var in variables(state).items():
        if path in base_vars:
            var.set_value(base_vars[path][...])
            continue
        if not isinstance(var, LoraParam):
            raise ValueError(f"{'.'.join(map(str, path))} is neither a base parameter nor a LoRA slot")
        sharding = param_sharding(var, model.mesh)
        key = (tuple(var.shape), jnp.dtype(var.dtype).name, sharding)
        if key not in zeros:
            zeros[key] = jax.jit(lambda shape=var.shape, dt=var.dtype: jnp.zeros(shape, dt), out_shardings=sharding)
        var.set_value(zeros[key]())
    return LoadedModel(spec, graphdef, state, model.dtype, model.mesh, source_spec=source_spec)


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """A LoRA-carrying projection as adapters see it."""

    in_features: int
    parts: tuple[tuple[str | None, tuple[int, ...]], ...]  # (part, output dims), kernel order
    num_slots: int
    max_rank: int


def lora_modules(model) -> dict[tuple, LoraModule]:
    """Module path -> LoraModule for every LoRA-carrying projection of a loaded model."""
    from flax import nnx

    out = {}
    for path, node in nnx.iter_graph(model.module()):
        if isinstance(node, LoraMixin):
            num_slots, in_features, _, max_rank = node.lora_a.shape
            parts = tuple((p, tuple(getattr(node, lora_b_name(p)).shape[2:])) for p in node.lora_part_names)
            out[tuple(path)] = LoraModule(in_features, parts, num_slots, max_rank)
    return out

"""Typed array boundaries, shared by the kernels and the engine above them (this floor
imports nothing of lmidist_jax): the paged KV layout as a jaxtyping type, the dataclass
pytree that carries a step's arrays, and the names of the dimensions the annotations use.

Annotations such as ``Int32[ArrayLike, "tokens"]`` (inputs; ArrayLike: numpy arrays are
accepted as before) and ``Float[Array, "tokens heads head_dim"]`` (outputs) are checked when the test suite runs
(jaxtyping's import hook with beartype, tests/conftest.py); a user's process does not
check them. Dimension names (the same name must have the same size in one call):

  tokens      T, the step's token bucket          seqs        S, its sequence bucket
  max_blocks  W, block-table columns              embed       hidden size
  heads       query heads                         kv_heads    key/value heads
  head_dim    D                                   vocab       vocabulary
  in_features a projection's input                num_blocks  KV blocks of a layer's pool
  block_size  tokens per KV block                 experts     E, mixture-of-experts experts
"""

from __future__ import annotations

import dataclasses

import jax
from jaxtyping import ArrayLike, Float

# The paged KV layout every attention path shares (reference.py describes it). Block 0
# of each pool is the trash block padding tokens write into. ArrayLike: the kernels
# accept host (numpy) pages too, as they always did.
KVPages = Float[ArrayLike, "kv_heads num_blocks block_size head_dim"]


def pytree_dataclass(cls):
    """Registers the dataclass ``cls`` as a pytree, as ``jax.tree_util.register_dataclass``
    does (fields with ``metadata=dict(static=True)`` are static), except that unflattening
    sets the fields without calling ``__init__``.

    NOTE: JAX unflattens with whatever leaves a transformation needs (shardings,
    ``None``, placeholder objects); a type-checked ``__init__`` would refuse them. So
    only a construction by code (``cls(...)``, ``dataclasses.replace``) is checked.
    """
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if not f.metadata.get("static", False))
    static = tuple(f.name for f in fields if f.metadata.get("static", False))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in data)

    def flatten(obj):
        return tuple(getattr(obj, name) for name in data), tuple(getattr(obj, name) for name in static)

    def flatten_with_keys(obj):
        return tuple((key, getattr(obj, name)) for key, name in zip(keys, data)), \
            tuple(getattr(obj, name) for name in static)

    def unflatten(aux, children):
        obj = object.__new__(cls)
        obj.__dict__.update(zip(data, children))
        obj.__dict__.update(zip(static, aux))
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls

"""Saving a loaded model's parameters with orbax and restoring them onto any mesh (the
files themselves are ``converters.orbax_cache``'s business)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from converters import orbax_cache

from .. import parallel
from . import loader


def save_converted(model: loader.LoadedModel, hf_config: dict, directory, tokenizer_dir=None):
    """Write the parameters in the checkpoint's own head layout (whatever mesh they sit
    on), with the HF config and tokenizer files."""
    tree = loader.to_source_layout(model)
    return orbax_cache.save_tree(tree, hf_config, directory, dtype=str(jnp.dtype(model.dtype)),
                                 tokenizer_dir=tokenizer_dir)


def load_converted(spec, directory, *, dtype, mesh, max_model_len=None) -> loader.LoadedModel:
    """Restore onto ``mesh``: straight into place, each device reading its shard, unless
    the mesh needs replicated KV heads (then through the loader's part assembly)."""
    target_spec = loader.spec_for_mesh(spec, mesh.shape[parallel.TP_AXIS])
    if target_spec == spec:  # no KV heads to replicate for this mesh
        graphdef, state = loader.abstract_model(target_spec, dtype, max_model_len, mesh)
        params = loader.variables(state)

        abstract = {path: jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=loader.param_sharding(var, mesh))
                    for path, var in params.items()}
        flat = orbax_cache.restore_tree(directory, orbax_cache.nest_tree(abstract))
        for path, var in params.items():
            var.set_value(flat[path])
        return loader.LoadedModel(target_spec, graphdef, state, dtype, mesh, source_spec=spec)
    flat = {path: np.asarray(value) for path, value in orbax_cache.restore_tree(directory).items()}
    return loader.load_model(spec, loader.parts_of(spec, flat, dtype), dtype=dtype, mesh=mesh,
                             max_model_len=max_model_len)

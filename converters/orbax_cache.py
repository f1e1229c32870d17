"""Cache of converted parameters with orbax-checkpoint.

``save_converted`` writes the model's parameters (in the checkpoint's own head layout,
whatever mesh they sit on) plus the HF config and tokenizer files; ``load_converted``
restores them straight onto a mesh of any tensor-parallel degree, each device reading
only its shard. A directory written here is itself a valid ``model_id``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MARKER = "lmidist_converted.json"
PARAMS_DIR = "params"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json",
                    "vocab.json", "merges.txt", "added_tokens.json")


def is_converted_dir(path) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _unreplicate_kv(pure: dict, model) -> dict:
    """Undo the KV-head replication applied when TP exceeded the checkpoint's KV heads."""
    source, spec = model.source_spec, model.spec
    if source.num_kv_heads == spec.num_kv_heads:
        return pure
    r = spec.num_kv_heads // source.num_kv_heads
    for layer in pure["layers"].values():
        for name in ("k_proj", "v_proj"):
            proj = layer["attn"][name]
            for key, value in list(proj.items()):
                lead = value.shape[:-1]
                heads = value.reshape(*lead, spec.num_kv_heads, spec.head_dim)[..., ::r, :]
                proj[key] = heads.reshape(*lead, source.num_kv_heads * spec.head_dim)
    return pure


def save_converted(model, hf_config: dict, directory, tokenizer_dir=None) -> Path:
    import orbax.checkpoint as ocp

    final = Path(directory).absolute()
    if final.exists() and any(final.iterdir()) and not is_converted_dir(final):
        raise ValueError(f"save_converted={str(final)!r} exists and is not an earlier converted save: "
                         "give a new or empty directory")
    # Written next to the target and renamed at the end: an interrupted save leaves the
    # old one intact, and re-saving a converted directory onto itself keeps its tokenizer.
    directory = final.with_name(final.name + ".partial")
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    pure = _unreplicate_kv(nnx.to_pure_dict(model.state), model)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / PARAMS_DIR, pure)
        ckpt.wait_until_finished()
    with open(directory / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copy(src, directory / name)
    with open(directory / MARKER, "w") as f:
        json.dump({"format": "orbax", "dtype": str(jnp.dtype(model.dtype))}, f)
    if final.exists():
        shutil.rmtree(final)
    directory.rename(final)
    return final


def load_converted(spec, directory, *, dtype, mesh, max_model_len=None):
    """Restore onto ``mesh``; returns a LoadedModel."""
    import orbax.checkpoint as ocp

    from lmidist_jax import parallel
    from lmidist_jax.models import loader

    directory = Path(directory).absolute()
    target_spec = loader.spec_for_mesh(spec, mesh.shape[parallel.TP_AXIS])
    with ocp.StandardCheckpointer() as ckpt:
        if target_spec.num_kv_heads == spec.num_kv_heads:
            graphdef, state = loader.abstract_model(target_spec, dtype, max_model_len)
            variables = loader._variables(state)

            def target(path, var):
                sharding = parallel.named_sharding(var.get_metadata()["logical_axes"], var.shape, mesh)
                return jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)

            abstract = _nest({path: target(path, var) for path, var in variables.items()})
            restored = ckpt.restore(directory / PARAMS_DIR, abstract)
            flat = _flatten(restored)
            for path, var in variables.items():
                var.set_value(flat[path])
            return loader.LoadedModel(target_spec, graphdef, state, dtype, mesh, source_spec=spec)
        # Replicated KV heads: read on the host, then place through the loader.
        restored = ckpt.restore(directory / PARAMS_DIR)
    arrays = ((path, np.asarray(value)) for path, value in _flatten(restored).items())
    return loader.load_model(spec, arrays, dtype=dtype, mesh=mesh, max_model_len=max_model_len)


def _nest(flat: dict) -> dict:
    root: dict = {}
    for path, value in flat.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return root


def _flatten(tree, prefix=()) -> dict:
    out = {}
    for key, value in tree.items():
        # orbax may hand integer keys (layer indices) back as strings
        k = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (k,)))
        else:
            out[prefix + (k,)] = value
    return out

"""Cache of converted parameters with orbax-checkpoint: the file side.

``save_tree`` writes a nested dict of parameter arrays plus the HF config and tokenizer
files; ``restore_tree`` reads it back, onto given shardings when asked (each device
then reads only its shard). A directory written here is itself a valid ``model_id``;
what the tree holds and how it goes onto a mesh is the model loader's business.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = "lmidist_converted.json"
# Bumped when the parameter tree changes (2: fused q/k/v and gate/up).
LAYOUT_VERSION = 2
PARAMS_DIR = "params"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "chat_template.jinja", "chat_template.json", "generation_config.json",
                    "vocab.json", "merges.txt", "added_tokens.json")


def is_converted_dir(path) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def save_tree(tree: dict, hf_config: dict, directory, *, dtype: str, tokenizer_dir=None) -> Path:
    """Write ``tree`` (nested dict of arrays), config.json, tokenizer files and the marker
    into ``directory`` (replaced atomically; a foreign non-empty directory is refused)."""
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
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / PARAMS_DIR, tree)
        ckpt.wait_until_finished()
    with open(directory / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copy(src, directory / name)
    with open(directory / MARKER, "w") as f:
        json.dump({"format": "orbax", "dtype": dtype, "layout_version": LAYOUT_VERSION}, f)
    if final.exists():
        shutil.rmtree(final)
    directory.rename(final)
    return final


def restore_tree(directory, abstract: dict | None = None) -> dict:
    """The saved tree: onto the shardings of ``abstract`` (a nested dict of
    ``jax.ShapeDtypeStruct``), or as host arrays when None. Flat: path tuple -> array."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    try:
        with open(directory / MARKER) as f:
            version = json.load(f).get("layout_version", 1)
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory / MARKER} is unreadable: {e}") from e
    if version != LAYOUT_VERSION:
        raise ValueError(f"{directory} holds converted parameters of layout version {version}; this "
                         f"lmidist-jax reads version {LAYOUT_VERSION}: convert the model again from its "
                         "checkpoint (save_converted)")
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(directory / PARAMS_DIR, abstract) if abstract is not None else \
            ckpt.restore(directory / PARAMS_DIR)
    return flatten_tree(restored)


def nest_tree(flat: dict) -> dict:
    """{(a, b, c): x} -> {a: {b: {c: x}}}."""
    return _nest(flat)


def flatten_tree(tree: dict) -> dict:
    """Inverse of ``nest_tree`` (integer keys that orbax returns as strings restored)."""
    return _flatten(tree)


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

"""Finding a model directory and streaming its HF checkpoint tensors as numpy arrays.

lmidist-jax never downloads from the Hugging Face hub: a model is a local directory, an
HF hub id already in the local HF cache, or a known model name the caller resolves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

LOAD_FORMATS = ("auto", "safetensors", "pt")
# The one dtype table: option name -> numpy/jnp dtype name; synonyms -> option name.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_SYNONYMS = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
ACCEPTED_DTYPES = ("auto", *DTYPES, *DTYPE_SYNONYMS)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PT_INDEX = "pytorch_model.bin.index.json"
PT_SINGLE = "pytorch_model.bin"


class ModelLoadError(ValueError):
    """The model cannot be found or its checkpoint cannot be read."""


# ---------------------------------------------------------------------------------------
# Locating the model
# ---------------------------------------------------------------------------------------

def hf_hub_cache() -> Path:
    """The HF hub cache as the environment says now: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _looks_like_hub_id(model_id: str) -> bool:
    parts = model_id.split("/")
    return (len(parts) == 2 and all(parts) and not model_id.startswith((".", "~"))
            and not any(p in (".", "..") for p in parts))


def _local_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json (config.json is missing); "
                             "a model directory must hold an HF checkpoint: config.json plus weights")
    return path


def resolve_model_dir(model_id: str, revision: str | None = None,
                      known_models: Mapping[str, Callable[[], Path]] | None = None) -> Path:
    """A local checkpoint directory for `model_id`, never downloading from a model hub.

    `model_id` is a local directory, a name in `known_models` (name -> function returning
    its directory: `lmidist_jax.model_store.resolve_model` passes its fetchers), or an HF
    hub id ("org/name") already in the local HF cache (HF_HUB_CACHE / HF_HOME honoured).
    """
    known = dict(known_models or {})
    if not model_id or not str(model_id).strip():
        raise ModelLoadError("no model given: pass a local model directory, an HF hub id in the local HF "
                             f"cache, or one of: {', '.join(sorted(known))}")
    model_id = str(model_id)
    path = Path(model_id).expanduser()
    if path.is_dir():
        return _local_dir(path.absolute())
    if model_id in known:
        return Path(known[model_id]())
    if not _looks_like_hub_id(model_id):
        raise ModelLoadError(f"model {model_id!r} is neither an existing directory, a known model "
                             f"({', '.join(sorted(known))}) nor an HF hub id of the form org/name")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_hub_cache()
    try:
        snapshot = Path(snapshot_download(model_id, revision=revision, cache_dir=str(cache),
                                          local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        rev = f" (revision {revision})" if revision else ""
        raise ModelLoadError(
            f"model {model_id!r}{rev} is not in the local Hugging Face cache at {cache}, and lmidist-jax "
            "never downloads models. Download it yourself (e.g. `huggingface-cli download "
            f"{model_id}`, with HF_HOME/HF_HUB_CACHE pointing at that cache) or pass a local model "
            "directory instead.") from e
    return _local_dir(snapshot)


def load_config(model_dir: str | os.PathLike) -> dict:
    """The parsed config.json of a model directory."""
    path = Path(model_dir) / "config.json"
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found: config.json is missing from {model_dir}") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return config


def parse_dtype(dtype: str | None, config: dict) -> str:
    """The numpy/jnp dtype name to run in: "float32", "float16" or "bfloat16".

    `auto` takes the config's `torch_dtype` (or transformers-5 `dtype`), else float32.
    """
    value = "auto" if dtype is None else str(dtype).strip().lower()
    if value == "auto":
        configured = config.get("torch_dtype") or config.get("dtype")
        if not configured:
            return "float32"
        name = str(configured).lower().removeprefix("torch.")
        name = DTYPE_SYNONYMS.get(name, name)
        if name not in DTYPES:
            raise ValueError(f"the model config's dtype {configured!r} is not supported; pass an explicit "
                             f"dtype (one of: {', '.join(ACCEPTED_DTYPES)})")
        return DTYPES[name]
    value = DTYPE_SYNONYMS.get(value, value)
    if value not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; accepted: {', '.join(ACCEPTED_DTYPES)}")
    return DTYPES[value]


# ---------------------------------------------------------------------------------------
# Reading tensors
# ---------------------------------------------------------------------------------------

def _index_files(model_dir: Path, index_name: str) -> list[Path]:
    index_path = model_dir / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot read the shard index {index_path}: {e}") from e
    files = [model_dir / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{index_path} lists shard files missing from {model_dir}: {', '.join(missing)}")
    return files


def _safetensors_files(model_dir: Path) -> list[Path]:
    if (model_dir / SAFETENSORS_INDEX).is_file():
        return _index_files(model_dir, SAFETENSORS_INDEX)
    if (model_dir / SAFETENSORS_SINGLE).is_file():
        return [model_dir / SAFETENSORS_SINGLE]
    return sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated"))


def _pt_files(model_dir: Path) -> list[Path]:
    if (model_dir / PT_INDEX).is_file():
        return _index_files(model_dir, PT_INDEX)
    if (model_dir / PT_SINGLE).is_file():
        return [model_dir / PT_SINGLE]
    return sorted(model_dir.glob("pytorch_model*.bin"))


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ModelLoadError(
            "load_format=pt (pytorch_model*.bin checkpoints) needs torch: `pip install torch`, or convert "
            "the checkpoint to safetensors") from e
    return torch


def _torch_to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _iter_safetensors(files: list[Path], progress: bool) -> Iterator[tuple[str, np.ndarray]]:
    import ml_dtypes  # noqa: F401  (registers numpy's bfloat16, which safetensors returns)
    from safetensors import safe_open
    from tqdm.auto import tqdm

    handles = []
    try:
        total = 0
        for f in files:
            try:
                h = safe_open(str(f), framework="numpy")
            except Exception as e:
                raise ModelLoadError(f"cannot read safetensors file {f}: {e}") from e
            handles.append((f, h))
            total += len(h.keys())
        with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress) as bar:
            for f, h in handles:
                for name in h.keys():
                    yield name, h.get_tensor(name)
                    bar.update(1)
    finally:
        handles.clear()


def _iter_pt(files: list[Path], progress: bool) -> Iterator[tuple[str, np.ndarray]]:
    from tqdm.auto import tqdm

    torch = _import_torch()
    for f in tqdm(files, desc="loading weights", unit="file", disable=not progress):
        try:
            state = torch.load(str(f), weights_only=True, map_location="cpu")
        except Exception as e:
            raise ModelLoadError(f"cannot read PyTorch checkpoint {f}: {e}") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        for name, tensor in state.items():
            yield name, _torch_to_numpy(tensor)
        del state


def iter_checkpoint_tensors(model_dir: str | os.PathLike, load_format: str = "auto",
                            progress: bool = True) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF tensor name, numpy array) for every tensor of the checkpoint in `model_dir`.

    load_format: "auto" (safetensors if any, else pytorch_model*.bin), "safetensors" or
    "pt" (needs torch). bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays.
    Errors about the format or missing files are raised at call time, not on first use.
    """
    fmt = (load_format or "auto").lower()
    if fmt not in LOAD_FORMATS:
        raise ModelLoadError(f"unsupported load_format {load_format!r}; accepted: {', '.join(LOAD_FORMATS)}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    looked_for = {
        "safetensors": f"{SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE} or *.safetensors",
        "pt": f"{PT_INDEX}, {PT_SINGLE} or pytorch_model*.bin",
    }
    st_files = _safetensors_files(model_dir) if fmt in ("auto", "safetensors") else []
    if st_files:
        return _iter_safetensors(st_files, progress)
    pt_files = _pt_files(model_dir) if fmt in ("auto", "pt") else []
    if pt_files:
        _import_torch()
        return _iter_pt(pt_files, progress)
    wanted = [looked_for["safetensors"], looked_for["pt"]] if fmt == "auto" else [looked_for[fmt]]
    raise ModelLoadError(f"no weight files in {model_dir} for load_format={fmt}: looked for "
                         + "; then ".join(wanted))

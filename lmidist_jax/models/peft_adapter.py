"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors`` or
``.bin``) read and laid onto the LoRA slots of a loaded model, on the host, and written
from trained matrices (``adapter_targets`` + ``write_adapter``, the reader's inverse).

A PEFT module name (``model.layers.3.self_attn.q_proj``) is placed through the model
family's own weight map, fed the adapter's B matrix as if it were that module's
weight: the map says which parameter it lands in and, for a fused projection, which
part (q of a fused q/k/v, gate of gate/up) or how a fused checkpoint tensor (Phi-3's
``qkv_proj``) splits. So every family's layout, including its fused ones, works
without adapter-specific tables. The scaling (``lora_alpha / r``, or ``/ sqrt(r)`` with
``use_rslora``) is folded into B.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from .lora_linear import LoraModule
from .weight_map import Expert, Part, Transposed

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<ab>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter cannot be used with this model (the message says why)."""


@dataclasses.dataclass
class ModuleDelta:
    """One projection's adapter: A per fused part index [in, r], B per part [r, *dims]
    (scaling folded in)."""

    a: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    b: dict[str | None, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LoraAdapter:
    name: str
    path: str
    rank: int                       # largest rank over its modules
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # the checkpoint modules it adapts
    deltas: dict[tuple, ModuleDelta]  # model module path -> its matrices

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for d in self.deltas.values() for x in (*d.a.values(), *d.b.values()))


def _read_config(directory: Path, name: str) -> dict:
    if not directory.is_dir():
        raise AdapterError(f"adapter {name!r}: {str(directory)!r} is not a directory")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"adapter {name!r}: {str(directory)!r} has no {CONFIG_FILE} (a PEFT LoRA adapter "
                           f"directory holds {CONFIG_FILE} and {' or '.join(WEIGHT_FILES)})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {path} is not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {config.get('peft_type')!r} is not supported; "
                           f"accepted: LORA")
    refused = [(config.get("use_dora"), "use_dora=true (DoRA)"),
               (config.get("modules_to_save"), f"modules_to_save={config.get('modules_to_save')!r} (full copies "
                                               f"of base modules)"),
               (config.get("lora_bias"), "lora_bias=true"),
               (config.get("trainable_token_indices"), "trainable_token_indices (new token embeddings)")]
    for value, what in refused:
        if value:
            raise AdapterError(f"adapter {name!r}: {what} is not supported; only LoRA A/B matrices on the "
                               f"q/k/v/o/gate/up/down projections are")
    return config


def _read_tensors(directory: Path, name: str) -> dict[str, np.ndarray]:
    from converters.checkpoint import ModelLoadError, _iter_pt, _iter_safetensors

    files = [directory / f for f in WEIGHT_FILES if (directory / f).is_file()]
    if not files:
        raise AdapterError(f"adapter {name!r}: {str(directory)!r} has neither of {', '.join(WEIGHT_FILES)}")
    f = files[0]
    try:
        reader = _iter_safetensors if f.suffix == ".safetensors" else _iter_pt
        return {key: np.asarray(value, np.float32) for key, value in reader([f], False)}
    except ModelLoadError as e:
        raise AdapterError(f"adapter {name!r}: {e}") from None
    except Exception as e:  # a truncated or corrupt file fails inside the reader
        raise AdapterError(f"adapter {name!r}: cannot read {f}: {type(e).__name__}: {e}") from None


def _alpha(config: dict, module: str) -> float:
    """PEFT's per-module alpha: an ``alpha_pattern`` key matching the module name's end."""
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return float(value)
    return float(config.get("lora_alpha", 8))


def _place(spec, b: np.ndarray, family_map) -> list[tuple[tuple, str | None, np.ndarray]] | None:
    """(parameter path, part, B part [r, n]) for a B matrix [out, r] fed to the weight map
    as the module's weight; None when the map's layout does not fit it this way round."""
    rank = b.shape[1]
    # The map expects the base weight's layout: [out, in] (nn.Linear, most families) or
    # [in, out] (GPT-2's Conv1D). B is [out, r]: try it as is, then transposed.
    for candidate, transposed in ((b, False), (np.ascontiguousarray(b.T), True)):
        try:
            emitted = list(family_map(spec, candidate))
        except ValueError:
            continue
        out = []
        for path, value in emitted:
            if isinstance(value, Expert):
                raise AdapterError("LoRA on mixture-of-experts expert weights is not supported")
            part = value.slot if isinstance(value, Part) else None
            array = value.array if isinstance(value, Part) else value
            array = array.array.T if isinstance(array, Transposed) else np.asarray(array)
            out.append((path, part, array))
        if out and all(a.ndim == 2 and a.shape[0] == rank for _, _, a in out):
            return out
    return None


def _fit_part(b_part: np.ndarray, dims: tuple[int, ...]) -> np.ndarray | None:
    """B part [r, n] -> [r, *dims]; a part with fewer KV heads than ``dims`` has each
    head repeated (KV heads replicated for tensor parallelism, as the kernel)."""
    rank, n = b_part.shape
    want = math.prod(dims)
    if n == want:
        return b_part.reshape(rank, *dims)
    if n and want % n == 0 and dims[0] % (want // n) == 0:
        repeats = want // n
        return np.repeat(b_part.reshape(rank, dims[0] // repeats, *dims[1:]), repeats, axis=1)
    return None


def read_adapter(name: str, path: str | os.PathLike, *, spec, modules: dict[tuple, "LoraModule"],
                 max_rank: int) -> LoraAdapter:
    """Reads and checks a PEFT LoRA adapter against a model.

    ``spec``: the checkpoint's spec (its weight map names the modules); ``modules``: the
    model's LoRA-carrying projections (``lora_linear.lora_modules``). Raises AdapterError
    naming what does not fit.
    """
    from .families import map_checkpoint

    directory = Path(path)
    config = _read_config(directory, name)
    tensors = _read_tensors(directory, name)
    use_rslora = bool(config.get("use_rslora", False))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            what = ("embedding LoRA (lora_embedding_A/B)" if "lora_embedding" in key else
                    "a DoRA magnitude" if "lora_magnitude" in key else
                    "a LoRA bias" if ".lora_B" in key and key.endswith(".bias") else
                    "a full weight (modules_to_save / new vocabulary)")
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is {what}, which is not supported; only "
                               f"lora_A/lora_B matrices of the q/k/v/o/gate/up/down projections are")
        pairs.setdefault(m["module"], {})[m["ab"]] = value
    if not pairs:
        raise AdapterError(f"adapter {name!r}: its weights hold no lora_A/lora_B matrices")

    def family_map(spec_, array):
        return map_checkpoint(spec_, [(f"{family_map.module}.weight", array)])

    deltas: dict[tuple, ModuleDelta] = {}
    max_seen = 0
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(ab)).pop()
            raise AdapterError(f"adapter {name!r}: module {module!r} has no {missing} matrix")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"adapter {name!r}: module {module!r} has lora_A {a.shape} and lora_B {b.shape}; "
                               f"expected [r, in] and [out, r]")
        rank = a.shape[0]
        if rank > max_rank:
            raise AdapterError(f"adapter {name!r}: module {module!r} has rank {rank}, above max_lora_rank={max_rank}; "
                               f"raise option.max_lora_rank (8, 16, 32, 64) to at least {rank}")
        max_seen = max(max_seen, rank)
        alpha = _alpha(config, module)
        scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        family_map.module = module
        placed = _place(spec, b * scaling, family_map)
        if placed is None:
            raise AdapterError(f"adapter {name!r}: module {module!r} (lora_B {b.shape}) does not fit any weight "
                               f"of the {spec.architecture} base model")
        for param_path, part, b_part in placed:
            module_path = param_path[:-1]
            shown = ".".join(map(str, module_path))
            info = modules.get(module_path)
            if param_path[-1] != "kernel" or info is None:
                raise AdapterError(f"adapter {name!r}: module {module!r} is the model's {shown}, which carries no "
                                   f"LoRA (supported: the q/k/v/o/gate/up/down projections; not embeddings or "
                                   f"the LM head)")
            part_names = [p for p, _ in info.parts]
            if part not in part_names:
                raise AdapterError(f"adapter {name!r}: module {module!r} maps to part {part!r} of {shown}, which "
                                   f"has parts {part_names}")
            if a.shape[1] != info.in_features:
                raise AdapterError(f"adapter {name!r}: module {module!r} has lora_A {a.shape}: {a.shape[1]} inputs, "
                                   f"the model's {shown} has {info.in_features}")
            index = part_names.index(part)
            dims = info.parts[index][1]
            fitted = _fit_part(b_part, dims)
            if fitted is None:
                raise AdapterError(f"adapter {name!r}: module {module!r} has lora_B {b.shape}, which does not fit "
                                   f"the model's {shown} (outputs {dims})")
            delta = deltas.setdefault(module_path, ModuleDelta())
            if index in delta.a:
                raise AdapterError(f"adapter {name!r}: two of its modules adapt the same part of {shown}")
            delta.a[index] = np.ascontiguousarray(a.T)  # [in, r]
            delta.b[part] = fitted
    return LoraAdapter(name, str(directory), max_seen, float(config.get("lora_alpha", 8)), use_rslora,
                       tuple(sorted(pairs)), deltas)


# ---------------------------------------------------------------------------------------
# Writing: the reader's placement run backwards
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AdapterTarget:
    """One checkpoint module an adapter adapts, and where its matrices sit in the model."""

    module: str                # checkpoint module name ("model.layers.0.self_attn.q_proj")
    path: tuple                # the model's LoRA-carrying projection
    part: str | None           # its fused part (q of q/k/v), None when unfused
    part_index: int            # index of that part in the projection's lora_a
    in_features: int
    out_features: int
    fan_in_fan_out: bool       # the checkpoint stores the weight [in, out] (GPT-2's Conv1D)
    # [r, *dims] int: the flat index in PEFT's lora_B [out, r] of each element of the
    # model's B part (what the reader does to lora_B, as an index map).
    b_index: np.ndarray


def adapter_targets(spec, checkpoint_shapes: dict[str, tuple[int, ...]], targets, *,
                    modules: dict[tuple, LoraModule], rank: int) -> list[AdapterTarget]:
    """The checkpoint modules whose name ends in one of ``targets`` (PEFT's
    ``target_modules`` rule), each placed in the model through the family's weight map as
    ``read_adapter`` places it. ``checkpoint_shapes``: tensor name -> shape of the base
    checkpoint. Raises AdapterError naming a target that matches nothing or cannot carry a
    LoRA, and listing the ones that can."""
    from .families import map_checkpoint

    targets = tuple(targets)

    def family_map(spec_, array):
        return map_checkpoint(spec_, [(f"{family_map.module}.weight", array)])

    found: list[AdapterTarget] = []
    available: set[str] = set()   # suffixes of modules that can carry a LoRA
    matched: dict[str, list[str]] = {t: [] for t in targets}
    for name, shape in sorted(checkpoint_shapes.items(), key=lambda kv: _natural(kv[0])):
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        module = name[:-len(".weight")]
        suffix = module.rsplit(".", 1)[-1]
        family_map.module = module
        placed = None
        for out, inp in dict.fromkeys(((shape[0], shape[1]), (shape[1], shape[0]))):
            index = np.arange(out * rank, dtype=np.int64).reshape(out, rank)
            try:
                candidate = _place(spec, index, family_map)
            except (AdapterError, ValueError):
                candidate = None
            if candidate and all(modules.get(p[:-1]) is not None and p[-1] == "kernel"
                                 and modules[p[:-1]].in_features == inp for p, _, _ in candidate):
                placed = (candidate, out, inp)
                break
        if placed is None:
            continue
        available.add(suffix)
        if suffix not in matched:
            continue
        candidate, out, inp = placed
        if len(candidate) != 1:
            parts = ", ".join(str(part) for _, part, _ in candidate)
            raise AdapterError(f"target {suffix!r}: {module} is a fused checkpoint module (parts {parts} in one "
                               f"tensor); PEFT gives it one A shared by its parts, which training here does not "
                               f"support: target another module")
        (param_path, part, b_part), = candidate
        info = modules[param_path[:-1]]
        part_names = [p for p, _ in info.parts]
        dims = info.parts[part_names.index(part)][1]
        b_index = _fit_part(b_part, dims)
        if (b_index is None or not np.issubdtype(b_index.dtype, np.integer)
                or not np.array_equal(np.sort(b_index.ravel()), np.arange(out * rank))):
            raise AdapterError(f"target {suffix!r}: the {spec.architecture} weight map transforms {module}'s "
                               f"values (not only their layout), so an adapter for it cannot be written back")
        matched[suffix].append(module)
        fan_in_fan_out = tuple(shape) == (inp, out) and inp != out
        found.append(AdapterTarget(module, param_path[:-1], part, part_names.index(part), inp, out, fan_in_fan_out,
                                   b_index))
    missing = [t for t, names in matched.items() if not names]
    if missing:
        raise AdapterError(f"target module(s) {', '.join(map(repr, missing))} not found among the model's "
                           f"LoRA-capable modules; accepted: {', '.join(sorted(available)) or 'none'}")
    return found


def _natural(name: str):
    """Sort key putting layer 2 before layer 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def write_adapter(directory: str | os.PathLike, targets: list[AdapterTarget], a: dict[str, np.ndarray],
                  b: dict[str, np.ndarray], *, rank: int, lora_alpha: float, base_model_name_or_path: str,
                  target_modules, layers_to_transform=None) -> Path:
    """Writes a PEFT LoRA adapter directory. ``a[module]``: [in, r]; ``b[module]``: the
    model's B part [r, *dims] WITHOUT the alpha / r scaling (PEFT applies it on load).
    ``layers_to_transform``: PEFT's, when only some layers are adapted. Returns the directory."""
    import safetensors.numpy

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for t in targets:
        peft_b = np.zeros(t.out_features * rank, np.float32)
        peft_b[t.b_index.ravel()] = np.asarray(b[t.module], np.float32).ravel()
        tensors[f"base_model.model.{t.module}.lora_A.weight"] = np.ascontiguousarray(
            np.asarray(a[t.module], np.float32).T)                         # [r, in]
        tensors[f"base_model.model.{t.module}.lora_B.weight"] = peft_b.reshape(t.out_features, rank)  # [out, r]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(lora_alpha),
              "target_modules": sorted(set(target_modules)), "base_model_name_or_path": base_model_name_or_path,
              "fan_in_fan_out": any(t.fan_in_fan_out for t in targets), "lora_dropout": 0.0, "bias": "none",
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
              "inference_mode": True,
              "layers_to_transform": None if layers_to_transform is None else sorted(layers_to_transform)}
    safetensors.numpy.save_file(tensors, str(directory / WEIGHT_FILES[0]), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory

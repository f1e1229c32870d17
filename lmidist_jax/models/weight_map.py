"""Declarative weight maps: checkpoint tensor names -> parameters of the generic decoder.

A family declares a table ``{checkpoint name pattern: target}``. Patterns are literal
names with ``{i}`` for the layer index. A target says where the tensor goes and what
it needs on the way:

  to("layers.{i}.attn.o_proj", linear=True)    an HF nn.Linear weight [out, in] (kept
                                                 [in, out]: transposed on the devices)
  to("final_norm.scale")                        as it is (norms, embeddings, biases)
  part("layers.{i}.attn.qkv_proj", "q", ...)    one named part of a fused parameter
  split_qkv("layers.{i}.attn.qkv_proj", "concat" | "per_head" | "grouped", ...)
                                                 a fused checkpoint q/k/v tensor
  split_parts("layers.{i}.mlp.gate_up_proj", ("gate", "up"), ...)
                                                 a fused [gate | up] tensor
  expert("layers.{i}.mlp.w_down")               expert {j}'s slice of a parameter
                                                 stacked over experts
  stacked_experts("layers.{i}.mlp.w_down", ...)  a tensor holding every expert

``weight="linear"`` ([out, in], the default), ``"conv1d"`` (GPT-2's Conv1D, [in, out])
or ``"bias"`` ([out]) says how the checkpoint stores it; ``.kernel`` or ``.bias`` is
appended to the target path accordingly. A checkpoint tensor that matches no pattern
and no ``ignore`` pattern is an error: a silently dropped weight gives wrong outputs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator

import numpy as np
from einops import rearrange

from .spec import ModelSpec


@dataclasses.dataclass(frozen=True)
class Transposed:
    """A checkpoint matrix stored [out, in] that the model keeps as [in, out]. The loader
    transposes it on the devices: numpy's strided copy runs at ~0.4 GB/s (5x slower
    than XLA's transpose even on a CPU, and far slower than a GPU's)."""

    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[::-1])


@dataclasses.dataclass(frozen=True)
class Part:
    """One named part (``slot``) of a fused parameter, flat along the output: [in, n]
    (possibly ``Transposed``) for a kernel, [n] for a bias."""

    slot: str
    array: "np.ndarray | Transposed"


@dataclasses.dataclass(frozen=True)
class Expert:
    """Expert ``index``'s slice of a parameter stacked over experts ([E, ...]): its value
    in our layout (an array, a ``Transposed`` one, or a ``Part`` of its fused slice). The
    loader places each expert's slice on the mesh as it arrives and stacks them on the
    devices once all are there."""

    index: int
    value: "np.ndarray | Transposed | Part"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.array.shape if isinstance(self.value, Part) else self.value.shape)


Path = tuple
Emitted = Iterable[tuple[Path, "np.ndarray | Transposed | Part | Expert"]]
Target = Callable[[np.ndarray, ModelSpec, dict], Emitted]

WEIGHT_KINDS = ("linear", "conv1d", "bias")


def parse_path(template: str, groups: dict) -> Path:
    """"layers.{i}.attn.o_proj.kernel" -> ("layers", 3, "attn", "o_proj", "kernel")."""
    return tuple(int(p) if p.isdigit() else p for p in template.format(**groups).split("."))


def _leaf(weight: str) -> str:
    if weight not in WEIGHT_KINDS:
        raise ValueError(f"unknown weight kind {weight!r}; expected one of {WEIGHT_KINDS}")
    return "bias" if weight == "bias" else "kernel"


def _as_param(array: np.ndarray, weight: str):
    """Checkpoint layout -> ours: [out, in] becomes a lazily transposed [in, out]."""
    return Transposed(array) if weight == "linear" else array


def to(target: str, *, linear: bool = False) -> Target:
    """The tensor is the parameter ``target`` (a linear weight if ``linear``: [out, in],
    stored by us as [in, out], and ``target`` names the module: ``.kernel`` is added)."""
    if linear:
        return part(target, None, weight="linear")
    return lambda array, spec, groups: [(parse_path(target, groups), array)]


def part(module: str, slot: str | None, *, weight: str = "linear") -> Target:
    """The tensor is part ``slot`` of the fused parameter of ``module`` (or the whole
    parameter when ``slot`` is None)."""
    leaf = _leaf(weight)

    def emit(array, spec, groups):
        value = _as_param(array, weight)
        return [(parse_path(f"{module}.{leaf}", groups), value if slot is None else Part(slot, value))]
    return emit


def _out_axis(weight: str) -> int:
    return 1 if weight == "conv1d" else 0


def split_qkv_array(array: np.ndarray, layout: str, spec: ModelSpec, out_axis: int = 0) -> dict:
    """Split a fused q/k/v checkpoint tensor along ``out_axis`` into q, k, v parts.

    layout "concat":   [q (H*D) | k (KVH*D) | v (KVH*D)]        GPT-2, GPTBigCode, Phi-3,
                                                                  Falcon-7B (MQA)
           "per_head": [H, 3, D], q/k/v interleaved per head     GPT-NeoX, Falcon-RW, BLOOM
           "grouped":  [KVH, G + 2, D], per KV head: G queries,  Falcon-40B/180B
                       then its key, then its value              (new_decoder_architecture)
    """
    heads, kv_heads, head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
    a = np.moveaxis(array, out_axis, 0)
    rest = a.shape[1:]
    expected = (heads + 2 * kv_heads) * head_dim
    if a.shape[0] != expected:
        raise ValueError(f"fused q/k/v tensor has {a.shape[0]} outputs; {heads} heads + 2 x {kv_heads} "
                         f"KV heads of {head_dim} need {expected}")
    if layout == "concat":
        q, k, v = np.split(a, [heads * head_dim, (heads + kv_heads) * head_dim], axis=0)
    elif layout == "per_head":
        if kv_heads != heads:
            raise ValueError(f"per-head interleaved q/k/v needs as many KV heads as heads ({kv_heads} != {heads})")
        a = a.reshape(heads, 3, head_dim, *rest)
        q, k, v = (a[:, j].reshape(heads * head_dim, *rest) for j in range(3))
    elif layout == "grouped":
        group = heads // kv_heads
        a = a.reshape(kv_heads, group + 2, head_dim, *rest)
        q = a[:, :group].reshape(heads * head_dim, *rest)
        k = a[:, group].reshape(kv_heads * head_dim, *rest)
        v = a[:, group + 1].reshape(kv_heads * head_dim, *rest)
    else:
        raise ValueError(f"unknown fused q/k/v layout {layout!r}")
    return {slot: np.moveaxis(x, 0, out_axis) for slot, x in zip("qkv", (q, k, v))}


def split_qkv(module: str, layout: str, *, weight: str = "linear") -> Target:
    """A fused q/k/v checkpoint tensor -> the q, k, v parts of ``module``."""
    leaf = _leaf(weight)

    def emit(array, spec, groups):
        path = parse_path(f"{module}.{leaf}", groups)
        parts = split_qkv_array(array, layout, spec, _out_axis(weight))
        return [(path, Part(slot, _as_param(x, weight))) for slot, x in parts.items()]
    return emit


def split_parts(module: str, slots: tuple[str, ...], *, weight: str = "linear") -> Target:
    """A tensor made of equal parts concatenated along the output ([gate | up])."""
    leaf = _leaf(weight)

    def emit(array, spec, groups):
        path = parse_path(f"{module}.{leaf}", groups)
        pieces = np.split(array, len(slots), axis=_out_axis(weight))
        return [(path, Part(slot, _as_param(x, weight))) for slot, x in zip(slots, pieces)]
    return emit


# Mixture-of-experts targets: checkpoint names use ``{j}`` for the expert index.

def expert(param: str, slot: str | None = None, *, weight: str = "linear") -> Target:
    """One expert's tensor (expert ``{j}`` of the pattern) -> its slice of the stacked
    parameter ``param`` (part ``slot`` of the slice's fused layout, or all of it).
    ``weight``: "linear" ([out, in], transposed to ours) or "kernel" (already [in, out])."""
    if weight not in ("linear", "kernel"):
        raise ValueError(f"unknown expert weight kind {weight!r}; expected 'linear' or 'kernel'")

    def emit(array, spec, groups):
        value = Transposed(array) if weight == "linear" else array
        return [(parse_path(param, groups), Expert(int(groups["j"]), value if slot is None else Part(slot, value)))]
    return emit


def stacked_experts(param: str, slots: tuple[str, ...] | None = None, *, weight: str = "linear",
                    layout: str = "expert_major") -> Target:
    """A tensor holding every expert -> each expert's slice of ``param``.

    layout "expert_major": [E, out, in] (linear) or [E, in, out] (kernel), e.g.
                           transformers 5's ``experts.gate_up_proj`` [E, 2 * I, H]
           "rows":         [E * rows, cols], expert m in rows m * rows .. (DBRX's
                           ``experts.mlp.w1`` / ``v1`` / ``w2``, each [E * I, H])
    ``slots``: the expert's tensor is these parts concatenated along its output (gate | up).
    """
    if weight not in ("linear", "kernel"):
        raise ValueError(f"unknown expert weight kind {weight!r}; expected 'linear' or 'kernel'")
    if layout not in ("expert_major", "rows"):
        raise ValueError(f"unknown stacked-experts layout {layout!r}; expected 'expert_major' or 'rows'")

    def emit(array, spec, groups):
        num_experts = spec.num_experts
        if layout == "rows":
            if array.ndim != 2 or array.shape[0] % num_experts:
                raise ValueError(f"stacked expert tensor for {param} has shape {array.shape}; expected "
                                 f"[{num_experts} x rows, cols]")
            array = rearrange(array, "(experts rows) cols -> experts rows cols", experts=num_experts)
        if array.shape[0] != num_experts:
            raise ValueError(f"stacked expert tensor for {param} has {array.shape[0]} experts; the model has "
                             f"{num_experts}")
        path = parse_path(param, groups)
        out = []
        for index in range(num_experts):
            one = array[index]
            pieces = [(None, one)] if slots is None else list(
                zip(slots, np.split(one, len(slots), axis=0 if weight == "linear" else 1)))
            for slot, piece in pieces:
                value = Transposed(piece) if weight == "linear" else piece
                out.append((path, Expert(index, value if slot is None else Part(slot, value))))
        return out
    return emit


# Table shorthands: a checkpoint module's weight and (optional) bias in one entry each.

def linear(source: str, module: str) -> dict[str, Target]:
    """``source.weight`` (nn.Linear, [out, in]) and ``source.bias`` -> ``module``."""
    return {f"{source}.weight": to(module, linear=True), f"{source}.bias": to(f"{module}.bias")}


def norm(source: str, module: str) -> dict[str, Target]:
    """``source.weight`` / ``source.bias`` -> the ``scale`` / ``bias`` of norm ``module``."""
    return {f"{source}.weight": to(f"{module}.scale"), f"{source}.bias": to(f"{module}.bias")}


def fused_qkv(source: str, module: str, layout: str, *, weight: str = "linear") -> dict[str, Target]:
    """A fused q/k/v checkpoint module (weight and bias) -> the q, k, v parts of ``module``."""
    return {f"{source}.weight": split_qkv(module, layout, weight=weight),
            f"{source}.bias": split_qkv(module, layout, weight="bias")}


def _pattern(name: str) -> re.Pattern:
    """A table name -> its regular expression: ``{i}`` the layer, ``{j}`` the expert."""
    return re.compile(re.escape(name).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)") + "$")


class WeightMap:
    """A family's table from checkpoint names to parameters (see the module docstring)."""

    def __init__(self, rules: dict[str, Target], ignore: Iterable[str] = ()):
        self.rules = [(_pattern(name), target) for name, target in rules.items()]
        # Buffers that checkpoints carry but the model recomputes (regular expressions).
        self.ignore = [re.compile(p + "$") for p in (r".*rotary_emb\.inv_freq", *ignore)]

    def map(self, spec: ModelSpec, tensors: Iterable[tuple[str, np.ndarray]]
            ) -> Iterator[tuple[Path, "np.ndarray | Transposed | Part"]]:
        for name, array in tensors:
            if any(p.match(name) for p in self.ignore):
                continue
            for pattern, target in self.rules:
                m = pattern.match(name)
                if m:
                    yield from target(array, spec, m.groupdict())
                    break
            else:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the {spec.architecture} model")

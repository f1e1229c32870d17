"""Pre-quantized checkpoints (AWQ, GPTQ, SqueezeLLM): which method a checkpoint uses, the
quantized linear kind the decoder builds through ``LINEAR_KINDS`` (the decoder never knows
it holds one), and the mapping of a checkpoint's quantized tensors onto the model. The
formats themselves are read by ``converters/quantized_checkpoint.py`` into the packed
layout of ``pallas_kernels/w4a16.py``.

Embeddings, norms and the LM head are not quantized and load as in a dense checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from converters.quantized_checkpoint import (QUANT_NAME, QuantizationError, check_in_order, checkpoint_tensors,
                                             convert_module, required_leaves)
from pallas_kernels import w4a16

from .linear import LINEAR_KINDS, DenseLinear, LinearSpec, param
from .spec import ModelSpec
from .step_metadata import StepMetadata

METHODS = ("awq", "gptq", "squeezellm")
BITS = {"awq": (4,), "gptq": (4, 8), "squeezellm": (4,)}
GPTQ_FORMATS = ("gptq", "gptq_v2")
# Environment override of the matmul path ("auto": the Pallas kernel on a GPU, XLA elsewhere).
IMPL_ENV = "LMIDIST_QUANT_IMPL"
IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
# Projections that stay dense in every quantized checkpoint.
DENSE_ROLES = ("lm_head", "project_in", "project_out")
# The Pallas kernel runs up to this many tokens per step; above it, dequantize then one
# matmul (the crossover is measured by benchmarks/quant.py, see pallas_kernels/NOTES.md).
PALLAS_MAX_TOKENS = 64

__all__ = ["QuantizationError", "QuantConfig", "QuantizedLinear", "checkpoint_tensors", "configure", "detect",
           "map_checkpoint", "register"]


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    method: str                      # awq | gptq | squeezellm
    bits: int = 4
    group_size: int = -1             # input rows per scale group; -1: one group (per channel)
    act_order: bool = False          # GPTQ desc_act: each linear keeps a permutation of its inputs
    checkpoint_format: str = "gptq"  # GPTQ zeros stored minus one ("gptq") or not ("gptq_v2")
    # "pallas" (GPU), "xla" (dequantize, then matmul), "pallas_interpret" (the kernel on a CPU: tests)
    impl: str = "xla"
    pallas_max_tokens: int = PALLAS_MAX_TOKENS
    # > 1: the kernel runs per shard (shard_map over this many devices, as the mesh places
    # the packed weights); the XLA path leaves the sharding to XLA whatever this says.
    tensor_parallel_degree: int = 1

    @property
    def pack(self) -> int:
        return 32 // self.bits

    def tile_words(self, in_features: int) -> int:
        """T of the kernel's packed layout for a weight of ``in_features`` inputs: tiles of
        P*T rows inside one group (per channel or codebook: inside each device's rows)."""
        group = self.group_size
        if group == -1 or self.method == "squeezellm":
            tp = self.tensor_parallel_degree
            group = in_features // tp if in_features % (tp * self.pack) == 0 else in_features
        return w4a16.tile_words_for(group, self.bits)

    @property
    def kind(self) -> str:
        """The linear-kind name this configuration registers under."""
        group = "ch" if self.group_size == -1 else self.group_size
        act = "-act" if self.act_order else ""
        return (f"{self.method}-w{self.bits}-g{group}{act}-{self.checkpoint_format}-{self.impl}{self.pallas_max_tokens}"
                f"-tp{self.tensor_parallel_degree}")


# ---------------------------------------------------------------------------------------
# Detection and validation
# ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QuantizationError(f"{path} is not valid JSON: {e}") from e


def _int(value, what: str, source: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise QuantizationError(f"{source}: {what}={value!r} is not an integer") from None


def detect(model_dir, hf_config: dict) -> QuantConfig | None:
    """The checkpoint's quantization: ``quantization_config`` in config.json (AWQ, GPTQ),
    else AutoGPTQ's ``quantize_config.json``, else SqueezeLLM's ``quant_config.json``;
    None for a dense checkpoint."""
    model_dir = Path(model_dir)
    source = "config.json quantization_config"
    qc = hf_config.get("quantization_config")
    if qc is None:
        qc = _read_json(model_dir / "quantize_config.json")
        source = "quantize_config.json"
        if qc is not None:
            qc = {"quant_method": "gptq", **qc}
    if qc is None:
        squeeze = _read_json(model_dir / "quant_config.json")
        if squeeze is None:
            return None
        if "wbits" not in squeeze:
            raise QuantizationError(f"{model_dir / 'quant_config.json'} has no wbits; SqueezeLLM's is {{\"wbits\": 4}}")
        return QuantConfig("squeezellm", bits=_int(squeeze["wbits"], "wbits", "quant_config.json"))
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt not in GPTQ_FORMATS:
            raise QuantizationError(f"{source}: checkpoint_format={fmt!r} is not supported; accepted: "
                                    f"{', '.join(GPTQ_FORMATS)}")
        return QuantConfig("gptq", bits=_int(qc.get("bits", 4), "bits", source),
                           group_size=_int(qc.get("group_size", -1), "group_size", source),
                           act_order=bool(qc.get("desc_act", False)), checkpoint_format=fmt)
    if method == "awq":
        version = str(qc.get("version") or qc.get("format") or "gemm").lower()
        if version != "gemm":
            raise QuantizationError(f"{source}: AWQ version={version!r} is not supported; accepted: gemm")
        return QuantConfig("awq", bits=_int(qc.get("bits", qc.get("w_bit", 4)), "bits", source),
                           group_size=_int(qc.get("group_size", qc.get("q_group_size", 128)), "group_size", source),
                           checkpoint_format="gemm")
    raise QuantizationError(f"{source}: quant_method={method!r} is not supported; accepted: {', '.join(METHODS)}")


def _input_sizes(spec: ModelSpec) -> list[tuple[str, int, bool]]:
    """(projection, input features, row-parallel?) of every quantized projection."""
    mlp = [("gate/up", spec.hidden_size, False)] if spec.mlp_type == "gated" else [("up", spec.hidden_size, False)]
    return [("q/k/v", spec.hidden_size, False), ("o", spec.q_size, True), *mlp,
            ("down", spec.intermediate_size, True)]


def configure(spec: ModelSpec, model_dir, hf_config: dict, quantize: str | None, tensor_parallel_degree: int = 1,
              platform: str | None = None) -> tuple[ModelSpec, QuantConfig | None]:
    """The spec to build (its ``linear_kind`` the registered quantized kind) and the
    quantization of the checkpoint in ``model_dir``; ``quantize`` is the option (None:
    detect). Every mismatch is a startup error naming the value and what is accepted."""
    detected = detect(model_dir, hf_config)
    if quantize is not None:
        quantize = quantize.lower()
        if detected is None:
            raise QuantizationError(
                f"option.quantize={quantize} but {model_dir} is not a quantized checkpoint (no quantization_config "
                f"in config.json, no quantize_config.json or quant_config.json); leave quantize unset for it")
        if detected.method != quantize:
            raise QuantizationError(
                f"option.quantize={quantize} contradicts the checkpoint in {model_dir}, which is quantized with "
                f"{detected.method}; set quantize={detected.method} or leave it unset")
    if detected is None:
        return spec, None
    config = detected
    if config.bits not in BITS[config.method]:
        raise QuantizationError(f"{config.bits}-bit {config.method} is not supported; supported bits for "
                                f"{config.method}: {', '.join(map(str, BITS[config.method]))}")
    if spec.mlp_type == "moe":
        raise QuantizationError(f"quantized mixture-of-experts models ({spec.architecture}) are not supported")
    tp = int(tensor_parallel_degree)
    group = config.group_size
    if config.method != "squeezellm" and not (group == -1 or group > 0):
        raise QuantizationError(f"group_size={group} is not valid; accepted: -1 (per channel) or a positive integer")
    for name, size, row_parallel in _input_sizes(spec):
        local = size // tp if row_parallel else size
        if row_parallel and size % tp:
            raise QuantizationError(f"tensor_parallel_degree={tp} does not divide the {size} inputs of {name}")
        if local % config.pack:
            raise QuantizationError(f"the {local} inputs of {name} per device are not a multiple of "
                                    f"{config.pack} (values per packed {config.bits}-bit word)")
        if config.method != "squeezellm" and group != -1 and local % group:
            where = f"the {local} inputs each of {tp} devices holds" if row_parallel and tp > 1 else f"the {size} inputs"
            raise QuantizationError(
                f"group_size={group} does not divide {where} of {name}: whole groups must sit on one device; "
                f"accepted: a tensor_parallel_degree with ({size} / degree) divisible by {group}")
    platform = platform or jax.devices()[0].platform
    impl = os.environ.get(IMPL_ENV, "auto").lower()
    if impl not in IMPLS:
        raise QuantizationError(f"{IMPL_ENV}={impl} is not valid; accepted: {', '.join(IMPLS)}")
    if impl == "auto":
        impl = "pallas" if platform in ("gpu", "cuda", "rocm") else "xla"
    config = dataclasses.replace(config, impl=impl, tensor_parallel_degree=tp)
    register(config)
    return dataclasses.replace(spec, linear_kind=config.kind), config


# ---------------------------------------------------------------------------------------
# The linear kind
# ---------------------------------------------------------------------------------------

class QuantizedLinear(nnx.Module):
    """``y = x @ W + b`` with W held packed (``pallas_kernels/w4a16.py`` layout), its
    output dims (and fused parts) as ``DenseLinear``'s kernel: qweight
    [in / P, *out_shape], scales and zeros [groups, *out_shape] (or a codebook lut
    [16, *out_shape]), all sharded like the dense kernel; ``perm`` [in] (act-order GPTQ)
    reorders the activations to the rows' sorted order."""

    def __init__(self, spec: LinearSpec, *, dtype, config: QuantConfig):
        self.config = config
        self.out_shape = spec.out_shape
        fused = dict(fused=spec.fused)
        rows = spec.in_features // config.pack
        self.qweight = param((rows, *spec.out_shape), jnp.int32, spec.axes, **fused)
        if config.method == "squeezellm":
            self.lut = param((1 << config.bits, *spec.out_shape), dtype, (None, *spec.axes[1:]), **fused)
            self.scales = self.zeros = None
        else:
            groups = 1 if config.group_size == -1 else spec.in_features // config.group_size
            self.lut = None
            self.scales = param((groups, *spec.out_shape), dtype, spec.axes, **fused)
            self.zeros = param((groups, *spec.out_shape), dtype, spec.axes, **fused)
        self.perm = param((spec.in_features,), jnp.int32, (None,)) if config.act_order else None
        self.bias = param(spec.out_shape, dtype, spec.axes[1:], **fused) if spec.use_bias else None

    def __call__(self, x: Float[Array, "tokens in_features"], md: StepMetadata | None = None
                 ) -> Float[Array, "tokens *out_shape"]:
        config = self.config
        if self.perm is not None:
            x = jnp.take(x, self.perm[...], axis=-1)
        qweight = self.qweight[...]
        lut = None if self.lut is None else self.lut[...]
        scales = None if self.scales is None else self.scales[...]
        zeros = None if self.zeros is None else self.zeros[...]
        tile = config.tile_words(qweight.shape[0] * config.pack)
        n = int(np.prod(qweight.shape[1:])) // _output_shards(self.qweight, config)
        if config.impl in ("pallas", "pallas_interpret") and x.shape[0] <= config.pallas_max_tokens \
                and w4a16.kernel_supports(x.shape[0], n, tile):
            y = self._kernel(x, qweight, scales, zeros, lut, tile)
        else:
            if lut is not None:
                w = w4a16.dequantize_lut(qweight, lut, bits=config.bits, tile_words=tile, dtype=x.dtype)
            else:
                w = w4a16.dequantize(qweight, scales, zeros, bits=config.bits, tile_words=tile, dtype=x.dtype)
            y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y

    def _kernel(self, x, qweight, scales, zeros, lut, tile: int):
        """The Pallas kernel; under tensor parallelism once per shard (shard_map), each
        device on its own slice of the packed weights as the mesh holds them: a
        column-parallel slice gives its outputs, a row-parallel one partial sums (psum)."""
        from jax.sharding import PartitionSpec

        from .. import parallel

        config = self.config
        operands = {"qweight": qweight, "scales": scales, "zeros": zeros, "lut": lut}
        names = [n for n, a in operands.items() if a is not None]

        def local(x, *arrays):
            a = dict(zip(names, arrays))
            flat = {n: v.reshape(v.shape[0], -1) for n, v in a.items()}
            y = w4a16.quant_matmul_pallas(x, flat["qweight"], flat.get("scales"), flat.get("zeros"), flat.get("lut"),
                                          bits=config.bits, tile_words=tile,
                                          interpret=config.impl == "pallas_interpret")
            return y.reshape(x.shape[0], *a["qweight"].shape[1:])

        tp = config.tensor_parallel_degree
        if tp == 1:
            return local(x, *(operands[n] for n in names))
        mesh = parallel.make_mesh(tp)
        specs = [parallel.partition_spec(getattr(self, n).get_metadata()["logical_axes"], operands[n].shape, mesh)
                 for n in names]
        q_spec = tuple(specs[0]) + (None,) * (qweight.ndim - len(specs[0]))
        row_parallel = q_spec[0] is not None

        def body(x, *arrays):
            y = local(x, *arrays)
            return jax.lax.psum(y, parallel.TP_AXIS) if row_parallel else y

        return jax.shard_map(body, mesh=mesh, in_specs=(PartitionSpec(None, q_spec[0]), *specs),
                             out_specs=PartitionSpec(None, *q_spec[1:]), check_vma=False)(
            x, *(operands[n] for n in names))


def _output_shards(qweight, config: QuantConfig) -> int:
    """How many devices split ``qweight``'s outputs (column-parallel: the TP degree)."""
    from .. import parallel

    if config.tensor_parallel_degree == 1:
        return 1
    spec = parallel.partition_spec(qweight.get_metadata()["logical_axes"], qweight.shape,
                                   parallel.make_mesh(config.tensor_parallel_degree))
    return config.tensor_parallel_degree if any(a is not None for a in tuple(spec)[1:]) else 1


def register(config: QuantConfig) -> str:
    """Registers the linear kind of ``config`` in ``LINEAR_KINDS`` (idempotent); returns
    its name. The LM head (and OPT's projections) stay dense."""
    def make(spec: LinearSpec, *, dtype):
        if spec.role in DENSE_ROLES:
            return DenseLinear(spec, dtype=dtype)
        return QuantizedLinear(spec, dtype=dtype, config=config)

    LINEAR_KINDS.setdefault(config.kind, make)
    return config.kind


# ---------------------------------------------------------------------------------------
# Checkpoint tensors -> the model's parameters
# ---------------------------------------------------------------------------------------

def map_checkpoint(spec: ModelSpec, tensors: Iterable[tuple[str, np.ndarray]],
                   config: QuantConfig | None) -> Iterator:
    """(parameter path, value) for ``load_model``: the family's weight map for the dense
    tensors; each quantized linear's tensors, once all have arrived, converted and
    placed where the family puts that linear's ``.weight`` (fused parts included)."""
    from .families import family_of, map_checkpoint as dense_map
    from .weight_map import Part, Transposed

    if config is None:
        yield from dense_map(spec, tensors)
        return
    weight_map = family_of(spec.architecture).weight_map(spec)
    required = required_leaves(config)
    pending: dict[str, dict] = {}
    done: dict[str, tuple] = {}           # checkpoint module -> its model module path
    perms: dict[tuple, np.ndarray] = {}   # model module path -> permutation (shared by fused parts)
    for name, array in tensors:
        m = QUANT_NAME.match(name)
        if m is None:
            for path, value in weight_map.map(spec, [(name, array)]):
                if path[-1] == "kernel" and path[0] not in DENSE_ROLES:
                    raise QuantizationError(
                        f"checkpoint tensor {name} is a dense weight where the {config.method} model expects a "
                        f"quantized one (qweight, ...); checkpoints mixing dense and quantized layers are not supported")
                yield path, value
            continue
        module, leaf = m.groups()
        if module in done:
            if leaf == "g_idx" and not config.act_order:  # arrived after the others: must be in order
                check_in_order(module, np.asarray(array), done[module][1], config)
                continue
            raise QuantizationError(f"the checkpoint holds {name} twice")
        parts = pending.setdefault(module, {})
        parts[leaf] = array
        if not all(k in parts for k in required):
            continue
        del pending[module]
        converted = convert_module(module, parts, config)
        perm = converted.pop("perm", None)
        module_path = None
        for leaf_name, value in converted.items():
            # Our arrays are [rows, out]: given to the family's rule as an [out, rows] weight,
            # its split into fused parts (q/k/v, gate/up) works on the output dim as for dense.
            for path, placed in weight_map.map(spec, [(f"{module}.weight", value.T)]):
                if not isinstance(placed.array if isinstance(placed, Part) else placed, Transposed):
                    raise QuantizationError(f"{module} is stored [in, out] (GPT-2's Conv1D) by {spec.architecture}; "
                                            f"quantized checkpoints of such layers are not supported")
                module_path = path[:-1]
                yield (*module_path, leaf_name), placed
        done[module] = (module_path, converted["qweight"].shape[0] * config.pack)
        if perm is not None:
            if module_path in perms:
                if not np.array_equal(perms[module_path], perm):
                    raise QuantizationError(f"the fused parts of {'.'.join(map(str, module_path))} (e.g. {module}) "
                                            f"have different act-order permutations (g_idx); they must share one")
                continue
            perms[module_path] = perm
            yield (*module_path, "perm"), perm
    for module, parts in pending.items():
        missing = [k for k in required if k not in parts]
        raise QuantizationError(f"checkpoint module {module} has {', '.join(sorted(parts))} but no "
                                f"{', '.join(missing)}; {config.method} needs {', '.join(required)}")

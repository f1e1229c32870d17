"""The engine configuration: typed, validated, built from LMI's sources.

Sources, in increasing precedence::

    defaults < environment variables < serving.properties < Python keyword options

(``LLM(model_id, **options)``, ``lmidist-jax ... --option NAME=VALUE``). Every source uses
the same option names; see :mod:`lmidist_jax.config.properties` for how
``option.<name>`` keys and ``OPTION_<NAME>`` / alias environment variables map to them.
String values are coerced: booleans ``true``/``false`` (any case), integers, floats.
Unknown names are logged as a warning and ignored.

Options
=======

==================================  ============  ==========================================================
name                                default       meaning
==================================  ============  ==========================================================
engine                              MPI           LMI engine name: MPI or Python (both run this engine)
rolling_batch                       lmi-dist      rolling-batch implementation: lmi-dist (auto = lmi-dist)
model_id                            None          local HF directory, cached HF hub id, or a known name
                                                  (None: the model directory of ``serve --model-dir``)
revision                            None          HF hub revision of model_id
tensor_parallel_degree              max           devices to shard the model over; ``max`` = all
                                                  visible devices; resolved to an int (1 when unset
                                                  while tensor parallelism is not yet supported)
max_rolling_batch_size              32            most sequences decoded together
max_rolling_batch_prefill_tokens    None          most prompt tokens per step (None: 2048, on the CPU
                                                  256, measured: a request arriving during a long
                                                  prompt waits 2.5 s, not 32 s at 2048, for the same
                                                  prefill speed; at least max_rolling_batch_size, at
                                                  most max_model_len). Longer prompts run in chunks
                                                  between the decode steps of running requests; a
                                                  chunk leaves room for shorter prompts
max_model_len                       None          longest prompt + output (None: from the HF config)
load_format                         auto          checkpoint format: auto, safetensors, pt
enforce_eager                       False         do not compile the step functions ahead (no warm-up)
gpu_memory_utilization              0.9           fraction of accelerator memory the engine may use (0, 1]
quantize                            None          awq, gptq, squeezellm pre-quantized checkpoint
                                                  (None: detected from the checkpoint)
speculative_draft_model             None          draft model for speculative decoding (same vocabulary)
draft_model_tp_size                 1             draft model's TP degree: 1 (whole on every device) or tp
speculative_length                  5             tokens proposed per speculative step (>= 1)
record_acceptance_rate              False         log each request's speculative acceptance record
enable_lora                         False         serve PEFT LoRA adapters, many in one batch
max_loras                           4             adapters in one batch (needs enable_lora)
max_lora_rank                       16            largest adapter rank: 8, 16, 32, 64 (needs enable_lora)
lora_extra_vocab_size               256           extra vocabulary of adapters (needs enable_lora)
max_cpu_loras                       None          adapters kept in host memory, >= max_loras (needs enable_lora)
adapter_roots                       None          comma-separated directories under which POST /models/<m>/adapters
                                                  may read adapters (None: the model directory)
dtype                               auto          fp32, fp16, bf16 (or float32, float16, bfloat16), auto = config's
trust_remote_code                   False         accepted for LMI compatibility (no remote code is run)
enable_prefix_caching               False         reuse the KV cache of shared prompt prefixes
max_logprobs                        20            most logprobs a request may ask for (>= 0)
output_formatter                    None          json, jsonlines, sse (None: jsonlines when streaming, else json)
job_queue_size                      1000          most requests waiting in the server's queue
drain_seconds                       20            on SIGTERM/SIGINT, seconds the server lets requests in
                                                  flight finish (new ones get 503) before it exits
block_size                          16            tokens per KV-cache block: 4, 8, 16, 32, 64, 128
num_kv_blocks                       None          KV-cache blocks (>= 2); None: sized from memory
kv_cache_memory_gb                  None          KV-cache memory in GiB (> 0); None: sized from memory
attention_backend                   auto          auto, xla, mosaic_gpu, triton
compilation_cache_dir               auto          JAX persistent compilation cache directory; auto =
                                                  ``jax_compilation_cache`` beside the models
                                                  ($LMIDIST_JAX_CACHE or ~/.cache/lmidist_jax; a
                                                  directory JAX was already given wins), none = off
seed                                0             engine random seed (sampling without a request seed)
decode_steps                        auto          decode steps run per engine step on the device (>= 1); auto =
                                                  8 on a GPU (1 on the CPU, with a draft model, for T5)
save_converted                      None          directory to save the converted (Orbax) model to
==================================  ============  ==========================================================

Features marked "not yet supported" are validated (a wrong value gets its own message)
and then refused: see :data:`NOT_YET_SUPPORTED` and :data:`TENSOR_PARALLEL_SUPPORTED`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from converters.checkpoint import DTYPE_SYNONYMS, DTYPES
from pallas_kernels import ATTENTION_BACKENDS

from . import properties as _props
from .errors import ConfigError

logger = logging.getLogger("lmidist_jax")


# Options that are validated, then refused when set to a non-default value. Remove a name
# once the engine implements the feature.
NOT_YET_SUPPORTED: set[str] = set()

# tensor_parallel_degree > 1 is refused while this is False (read at call time). While it
# is False an unset tensor_parallel_degree means 1 instead of "max".
TENSOR_PARALLEL_SUPPORTED: bool = True

# Options that need enable_lora=true when given.
LORA_OPTIONS = ("max_loras", "max_lora_rank", "max_cpu_loras", "lora_extra_vocab_size")


# -- value parsers -------------------------------------------------------------------------


class _Invalid(Exception):
    """Raised by a parser; the option's spec turns it into a ConfigError."""


_NONE_TEXT = {"", "none", "null"}


@dataclasses.dataclass(frozen=True)
class _Spec:
    name: str
    parse: Callable[[Any], Any]
    accepted: str


def _is_none_text(value) -> bool:
    return isinstance(value, str) and value.strip().lower() in _NONE_TEXT


def _to_int(value) -> int:
    if isinstance(value, bool):
        raise _Invalid
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _Invalid


def _to_float(value) -> float:
    if isinstance(value, bool):
        raise _Invalid
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _Invalid


def _bool() -> tuple[Callable, str]:
    def parse(value):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _Invalid

    return parse, "true or false"


def _int(minimum: int | None = None, choices: tuple[int, ...] | None = None,
         optional: bool = False) -> tuple[Callable, str]:
    if choices:
        accepted = "one of " + ", ".join(map(str, choices))
    elif minimum is not None:
        accepted = f"an integer >= {minimum}"
    else:
        accepted = "an integer"
    if optional:
        accepted += " (or none)"

    def parse(value):
        if optional and (value is None or _is_none_text(value)):
            return None
        n = _to_int(value)
        if choices and n not in choices:
            raise _Invalid
        if minimum is not None and n < minimum:
            raise _Invalid
        return n

    return parse, accepted


def _int_or_auto(minimum: int) -> tuple[Callable, str]:
    """An integer >= minimum, or "auto" (resolved where the device is known)."""
    parse_int, accepted = _int(minimum=minimum)

    def parse(value):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return parse_int(value)

    return parse, accepted + " or auto"


def _float(gt: float | None = None, le: float | None = None, optional: bool = False) -> tuple[Callable, str]:
    bounds = []
    if gt is not None:
        bounds.append(f"> {gt:g}")
    if le is not None:
        bounds.append(f"<= {le:g}")
    accepted = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    if optional:
        accepted += " (or none)"

    def parse(value):
        if optional and (value is None or _is_none_text(value)):
            return None
        x = _to_float(value)
        if not math.isfinite(x) or (gt is not None and not x > gt) or (le is not None and not x <= le):
            raise _Invalid
        return x

    return parse, accepted


def _seconds() -> tuple[Callable, str]:
    def parse(value):
        x = _to_float(value)
        if not math.isfinite(x) or x < 0:
            raise _Invalid
        return x

    return parse, "a number of seconds >= 0"


def _choice(*choices: str, synonyms: Mapping[str, str] | None = None, keep_case: bool = False,
            optional: bool = False) -> tuple[Callable, str]:
    synonyms = dict(synonyms or {})
    shown = list(choices) + [s for s in synonyms if s not in choices]
    accepted = "one of " + ", ".join(shown) + (" (or none)" if optional else "")
    lowered = {c.lower(): c for c in choices}

    def parse(value):
        if optional and (value is None or _is_none_text(value)):
            return None
        if not isinstance(value, str):
            raise _Invalid
        text = value.strip()
        key = text.lower()
        if key in synonyms:
            return synonyms[key]
        if key in lowered:
            return text if keep_case else lowered[key]
        raise _Invalid

    return parse, accepted


def _str(optional: bool = True) -> tuple[Callable, str]:
    def parse(value):
        if value is None or _is_none_text(value):
            if optional:
                return None
            raise _Invalid
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise _Invalid
        return value.strip()

    return parse, "a string" + (" (or none)" if optional else "")


def _cache_dir() -> tuple[Callable, str]:
    def parse(value):
        if value is None or _is_none_text(value):
            return None
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise _Invalid
        text = value.strip()
        return "auto" if text.lower() == "auto" else text

    return parse, "a directory, auto, or none (off)"


def _tensor_parallel() -> tuple[Callable, str]:
    def parse(value):
        if isinstance(value, str) and value.strip().lower() == "max":
            return "max"
        n = _to_int(value)
        if n < 1:
            raise _Invalid
        return n

    return parse, "max or an integer >= 1"


_QUANTIZE_DEPRECATED = {"bitsandbytes", "bitsandbytes8"}


def _quantize() -> tuple[Callable, str]:
    base, accepted = _choice("awq", "gptq", "squeezellm", optional=True)

    def parse(value):
        if isinstance(value, str) and value.strip().lower() in _QUANTIZE_DEPRECATED:
            raise ConfigError(
                f"option.quantize={value} is not valid: bitsandbytes quantization is deprecated in lmi-dist "
                f"and not supported; accepted {accepted}: use an awq, gptq or squeezellm pre-quantized model")
        return base(value)

    return parse, accepted


# -- the option table ----------------------------------------------------------------------

# name -> (parser, accepted text). The dataclass below holds the same names, in order.
_PARSERS: dict[str, tuple[Callable, str]] = {
    "engine": _choice("MPI", "Python", keep_case=True),
    "rolling_batch": _choice("lmi-dist", synonyms={"auto": "lmi-dist"}),
    "model_id": _str(),
    "revision": _str(),
    "tensor_parallel_degree": _tensor_parallel(),
    "max_rolling_batch_size": _int(minimum=1),
    "max_rolling_batch_prefill_tokens": _int(minimum=1, optional=True),
    "max_model_len": _int(minimum=1, optional=True),
    "load_format": _choice("auto", "safetensors", "pt"),
    "enforce_eager": _bool(),
    "gpu_memory_utilization": _float(gt=0, le=1),
    "quantize": _quantize(),
    "speculative_draft_model": _str(),
    "draft_model_tp_size": _int(minimum=1),
    "speculative_length": _int(minimum=1),
    "record_acceptance_rate": _bool(),
    "enable_lora": _bool(),
    "max_loras": _int(minimum=1),
    "max_lora_rank": _int(choices=(8, 16, 32, 64)),
    "lora_extra_vocab_size": _int(minimum=0),
    "max_cpu_loras": _int(minimum=1, optional=True),
    "adapter_roots": _str(),
    "dtype": _choice("auto", *DTYPES, synonyms=DTYPE_SYNONYMS),
    "trust_remote_code": _bool(),
    "enable_prefix_caching": _bool(),
    "max_logprobs": _int(minimum=0),
    "output_formatter": _choice("json", "jsonlines", "sse", optional=True),
    "job_queue_size": _int(minimum=1),
    "drain_seconds": _seconds(),
    "block_size": _int(choices=(4, 8, 16, 32, 64, 128)),  # 4: small CPU test caches
    "num_kv_blocks": _int(minimum=2, optional=True),
    "kv_cache_memory_gb": _float(gt=0, optional=True),
    "attention_backend": _choice(*ATTENTION_BACKENDS),
    "compilation_cache_dir": _cache_dir(),
    "seed": _int(),
    "decode_steps": _int_or_auto(minimum=1),
    "save_converted": _str(),
}


def _show(value) -> str:
    if isinstance(value, str) and (value == "" or value != value.strip()):
        return repr(value)
    return str(value)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The validated engine options (see the module docstring for the table). Build it with
    :meth:`from_sources` or :func:`config_from_kwargs`; the constructor does not validate."""

    engine: str = "MPI"
    rolling_batch: str = "lmi-dist"
    model_id: str | None = None
    revision: str | None = None
    tensor_parallel_degree: int = 1  # "max" in the sources; always resolved to an int here
    max_rolling_batch_size: int = 32
    max_rolling_batch_prefill_tokens: int | None = None
    max_model_len: int | None = None
    load_format: str = "auto"
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.9
    quantize: str | None = None
    speculative_draft_model: str | None = None
    draft_model_tp_size: int = 1
    speculative_length: int = 5
    record_acceptance_rate: bool = False
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    lora_extra_vocab_size: int = 256
    max_cpu_loras: int | None = None
    adapter_roots: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    enable_prefix_caching: bool = False
    max_logprobs: int = 20
    output_formatter: str | None = None
    job_queue_size: int = 1000
    drain_seconds: float = 20.0
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    attention_backend: str = "auto"
    compilation_cache_dir: str | None = "auto"  # None: off
    seed: int = 0
    decode_steps: int | str = "auto"
    save_converted: str | None = None

    # -- building --------------------------------------------------------------------------

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, config: Any) -> "EngineConfig":
        """``config`` itself when it is an EngineConfig; else (a stand-in with some of the
        options as attributes, such as an argparse namespace) those over the defaults. The
        readers then take typed attributes, each with its one default declared here."""
        if isinstance(config, cls):
            return config
        return cls(**{name: getattr(config, name) for name in cls.option_names() if hasattr(config, name)})

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each option's default as written in the sources (tensor_parallel_degree: "max")."""
        values = {f.name: f.default for f in dataclasses.fields(cls)}
        values["tensor_parallel_degree"] = "max"
        return values

    @classmethod
    def from_sources(cls, options: Mapping[str, Any] | None = None,
                     properties_path: str | os.PathLike | None = None,
                     model_dir: str | os.PathLike | None = None,
                     environ: Mapping[str, str] | None = None,
                     num_devices: int | None = None) -> "EngineConfig":
        """Merges defaults < environment (``os.environ`` when ``environ`` is None) <
        serving.properties (``properties_path``, else ``<model_dir>/serving.properties`` if
        present) < ``options`` (keyword options; ``None`` values count as not given), then
        coerces and validates every option.

        ``model_dir``: the model directory of ``serve --model-dir``; it is the model_id when
        no source sets one. ``num_devices``: the visible accelerators that
        ``tensor_parallel_degree`` may use (``jax.device_count()`` when None, looked up only
        when needed). Raises :class:`ConfigError`.
        """
        raw: dict[str, tuple[Any, str]] = {}  # name -> (value, where it came from)
        for name, (value, var) in _props.env_options_with_sources(environ).items():
            raw[name] = (value, f"environment variable {var}")

        path = Path(properties_path) if properties_path is not None else _props.find_properties(model_dir)
        if path is not None:
            if not path.is_file():
                raise ConfigError(f"serving.properties file {str(path)!r} does not exist")
            for name, value in _props.options_from_properties(_props.read_properties(path)).items():
                raw[name] = (value, f"{path}")

        for name, value in (options or {}).items():
            if value is None:
                continue
            name = name.removeprefix(_props.OPTION_PREFIX)
            raw[name] = (value, "keyword option")

        if model_dir is not None and "model_id" not in raw:
            raw["model_id"] = (os.fspath(model_dir), "model directory")
        return cls._build(raw, num_devices)

    @classmethod
    def _build(cls, raw: Mapping[str, tuple[Any, str]], num_devices: int | None) -> "EngineConfig":
        names = cls.option_names()
        unknown = sorted(n for n in raw if n not in _PARSERS)
        if unknown:
            logger.warning("unknown options ignored by lmidist-jax: %s",
                           ", ".join(f"{n} (from {raw[n][1]})" for n in unknown))

        values = cls.defaults()
        for name in names:
            if name in raw:
                value, source = raw[name]
                parse, accepted = _PARSERS[name]
                try:
                    values[name] = parse(value)
                except _Invalid:
                    raise ConfigError(f"option.{name}={_show(value)} (from {source}) is not valid: "
                                      f"accepted {accepted}") from None

        _check_combinations(values, given={n for n in raw if n in _PARSERS}, num_devices=num_devices)
        _check_supported(values, cls.defaults())
        return cls(**values)

    # -- reporting -------------------------------------------------------------------------

    def describe(self) -> str:
        """One ``name = value`` line per option (for the startup log)."""
        defaults = self.defaults()
        width = max(map(len, self.option_names()))
        lines = []
        for name in self.option_names():
            value = getattr(self, name)
            mark = "" if value != defaults[name] else "  (default)"
            lines.append(f"{name:<{width}} = {value!r}{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _visible_devices() -> int:
    import jax

    # Global count: in a multi-process (multi-host) run the mesh spans every process.
    return jax.device_count()


def _check_combinations(values: dict[str, Any], given: set[str], num_devices: int | None) -> None:
    tp = values["tensor_parallel_degree"]
    if "tensor_parallel_degree" not in given and not TENSOR_PARALLEL_SUPPORTED:
        tp = 1  # the default "max" would be refused on a multi-device host
    if tp == "max" or tp > 1:
        devices = _visible_devices() if num_devices is None else num_devices
        if tp == "max":
            tp = max(devices, 1)
        elif tp > devices:
            raise ConfigError(f"option.tensor_parallel_degree={tp} but only {devices} devices are visible: "
                              f"accepted max or an integer from 1 to {devices}")
    values["tensor_parallel_degree"] = tp

    draft_tp = values["draft_model_tp_size"]
    if draft_tp not in (1, tp):
        raise ConfigError(f"option.draft_model_tp_size={draft_tp} is not valid: accepted 1 or "
                          f"tensor_parallel_degree ({tp})")
    if values["speculative_draft_model"] and values.get("decode_steps", "auto") not in (1, "auto"):
        # A speculative step already gives a sequence several tokens per dispatch.
        raise ConfigError(f"option.decode_steps={values['decode_steps']} with option.speculative_draft_model is "
                          f"not valid: accepted decode_steps=1 when a draft model is set")

    if not values["enable_lora"]:
        for name in LORA_OPTIONS:
            if name in given:
                raise ConfigError(f"option.{name}={values[name]} is not valid without option.enable_lora=true: "
                                  f"accepted only together with enable_lora=true")
    else:
        max_cpu = values["max_cpu_loras"]
        if max_cpu is not None and max_cpu < values["max_loras"]:
            raise ConfigError(f"option.max_cpu_loras={max_cpu} is not valid: accepted an integer >= "
                              f"max_loras ({values['max_loras']})")


def _check_supported(values: dict[str, Any], defaults: dict[str, Any]) -> None:
    for name in sorted(NOT_YET_SUPPORTED):
        value = values.get(name)
        if value and value != defaults.get(name):
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ConfigError(f"option.{name}={shown} is not yet supported by lmidist-jax: "
                              f"accepted only the default ({_show(defaults.get(name))}) for now")
    tp = values["tensor_parallel_degree"]
    if not TENSOR_PARALLEL_SUPPORTED and tp > 1:
        raise ConfigError(f"option.tensor_parallel_degree={tp} is not yet supported by lmidist-jax: "
                          f"accepted only 1 for now")


def config_from_kwargs(model_id: str | os.PathLike | None = None, **options) -> EngineConfig:
    """The config of ``LLM(model_id, **options)``: keyword options > the model directory's
    serving.properties (when ``model_id`` is a local directory holding one) > environment >
    defaults."""
    if model_id is not None:
        model_id = os.fspath(model_id)
        options = {**options, "model_id": model_id}
    model_dir = model_id if model_id is not None and os.path.isdir(model_id) else None
    return EngineConfig.from_sources(options=options, model_dir=model_dir)

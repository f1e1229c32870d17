"""Reading the configuration sources of LMI: ``serving.properties`` and environment variables.

Both produce plain ``{option_name: string}`` dicts; typing and validation live in
:mod:`lmidist_jax.config.options`.

serving.properties (Java-properties style)::

    engine=MPI                        # top-level key -> option "engine"
    job_queue_size=100                # top-level key -> option "job_queue_size"
    option.model_id=/opt/ml/model     # option.<name> -> option "<name>"
    option.max_rolling_batch_size=64

Environment variables (LMI's rules):

* ``OPTION_<NAME>`` -> ``<name>`` lower-cased (``OPTION_MAX_ROLLING_BATCH_SIZE``);
* ``HF_MODEL_ID`` -> model_id, ``HF_REVISION`` -> revision,
  ``TENSOR_PARALLEL_DEGREE`` -> tensor_parallel_degree;
* aliases (TGI-style names): see :data:`ENV_ALIASES`. ``ENABLE_CUDA_GRAPHS`` is inverted
  into ``enforce_eager``.

Within the environment an ``OPTION_<NAME>`` variable wins over the direct names above,
which win over the aliases.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

from .errors import ConfigError

logger = logging.getLogger("lmidist_jax")

PROPERTIES_FILE = "serving.properties"
OPTION_PREFIX = "option."
ENV_OPTION_PREFIX = "OPTION_"

# Top-level serving.properties keys (no "option." prefix) that are engine options.
TOP_LEVEL_OPTIONS = frozenset({"engine", "job_queue_size"})

# Environment variables LMI reads directly (not OPTION_*).
ENV_DIRECT: dict[str, str] = {
    "HF_MODEL_ID": "model_id",
    "HF_REVISION": "revision",
    "TENSOR_PARALLEL_DEGREE": "tensor_parallel_degree",
}

# Alias environment variables (lowest precedence within the environment).
ENV_ALIASES: dict[str, str] = {
    "HF_MODEL_QUANTIZE": "quantize",
    "HF_MODEL_TRUST_REMOTE_CODE": "trust_remote_code",
    "SM_NUM_GPUS": "tensor_parallel_degree",
    "MAX_BATCH_PREFILL_TOKENS": "max_rolling_batch_prefill_tokens",
    "MAX_BATCH_SIZE": "max_rolling_batch_size",
    "ENABLE_CUDA_GRAPHS": "enforce_eager",  # inverted
    "CUDA_MEMORY_FRACTION": "gpu_memory_utilization",
}
INVERTED_ENV_ALIASES = frozenset({"ENABLE_CUDA_GRAPHS"})


# -- serving.properties ------------------------------------------------------------------


def _split_key_value(line: str) -> tuple[str, str]:
    """Java properties: the key ends at the first unescaped '=' or ':' (or whitespace)."""
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\":
            i += 2
            continue
        if c in "=:":
            return line[:i].strip(), line[i + 1:].strip()
        if c in " \t\f":
            key, rest = line[:i], line[i:].lstrip(" \t\f")
            if rest[:1] in ("=", ":"):
                rest = rest[1:]
            return key.strip(), rest.strip()
        i += 1
    return line.strip(), ""


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out, i = [], 0
    escapes = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append(escapes.get(nxt, nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_properties(text: str) -> dict[str, str]:
    """Parses Java-properties text: ``key=value`` (or ``key: value``), ``#``/``!`` comment
    lines, blank lines, whitespace trimmed, a trailing backslash continues the line.
    A repeated key keeps its last value."""
    result: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line[0] in "#!":
            continue
        # Continuation: an odd number of trailing backslashes joins the next line.
        while (len(line) - len(line.rstrip("\\"))) % 2 == 1 and i < len(lines):
            line = line[:-1] + lines[i].strip()
            i += 1
        key, value = _split_key_value(line)
        if key:
            result[_unescape(key)] = _unescape(value)
    return result


def read_properties(path: str | os.PathLike) -> dict[str, str]:
    """The key/value pairs of a ``serving.properties`` file, as written (``option.x``)."""
    return parse_properties(Path(path).read_text(encoding="utf-8"))


def find_properties(model_dir: str | os.PathLike | None) -> Path | None:
    """``<model_dir>/serving.properties`` if ``model_dir`` is a directory holding one."""
    if model_dir is None:
        return None
    candidate = Path(model_dir) / PROPERTIES_FILE
    return candidate if candidate.is_file() else None


def options_from_properties(properties: Mapping[str, str]) -> dict[str, str]:
    """Maps serving.properties keys to option names: ``option.<name>`` -> ``<name>``, the
    top-level keys of :data:`TOP_LEVEL_OPTIONS` as they are. Other top-level keys
    (DJL server settings such as ``minWorkers``) are not engine options: logged, ignored."""
    options: dict[str, str] = {}
    ignored = []
    for key, value in properties.items():
        if key.startswith(OPTION_PREFIX):
            options[key[len(OPTION_PREFIX):]] = value
        elif key in TOP_LEVEL_OPTIONS:
            options[key] = value
        else:
            ignored.append(key)
    if ignored:
        logger.info("serving.properties keys not used by lmidist-jax (ignored): %s", ", ".join(sorted(ignored)))
    return options


# -- environment ---------------------------------------------------------------------------


def env_options_with_sources(environ: Mapping[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """Like :func:`options_from_env`, with the variable each value came from:
    ``{name: (value, VARIABLE)}``."""
    env = os.environ if environ is None else environ
    found: dict[str, tuple[str, str]] = {}
    # Lowest precedence first; later assignments win.
    for var, name in ENV_ALIASES.items():
        if var in env:
            value = env[var]
            if var in INVERTED_ENV_ALIASES:
                value = _invert_bool(var, value)
            found[name] = (value, var)
    for var, name in ENV_DIRECT.items():
        if var in env:
            found[name] = (env[var], var)
    for var in sorted(env):
        if var.startswith(ENV_OPTION_PREFIX) and len(var) > len(ENV_OPTION_PREFIX):
            found[var[len(ENV_OPTION_PREFIX):].lower()] = (env[var], var)
    return found


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The options set by environment variables (``os.environ`` when ``environ`` is None),
    by LMI's rules (see the module docstring)."""
    return {name: value for name, (value, _) in env_options_with_sources(environ).items()}


def _invert_bool(var: str, value: str) -> str:
    text = str(value).strip().lower()
    if text == "true":
        return "false"
    if text == "false":
        return "true"
    raise ConfigError(f"environment variable {var}={value!r} is not valid: accepted true or false "
                      f"(it sets option.enforce_eager to the opposite)")

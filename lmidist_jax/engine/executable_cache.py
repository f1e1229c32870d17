"""Compiled step executables on disk, so that a later process skips tracing, lowering
and compiling a bucket (JAX's persistent compilation cache skips only the XLA compile:
tracing and lowering 30 unrolled decoder layers cost more than compiling on a warm cache).

An entry is keyed on everything that changes the program: jax/jaxlib versions, the
backend and its devices, the mesh, XLA flags, the model spec and dtype, the runner
options that shape the step, the bucket, the arguments' structure, shapes, dtypes and
shardings, and a hash of the lmidist_jax and pallas_kernels sources, so that a stale
entry is never found. Any miss or load error falls back to tracing (logged at debug).
Entries live in ``executables/`` inside JAX's compilation cache directory, written
atomically (temp file + rename) as processes share the directory. Loading an entry
unpickles it: the directory must be as trusted as JAX's own cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import jax

logger = logging.getLogger("lmidist_jax")

FORMAT = 1  # bump when the entry layout changes
SUBDIR = "executables"
_SOURCE_PACKAGES = ("lmidist_jax", "pallas_kernels")


@functools.cache
def source_hash() -> str:
    """sha256 of every .py file of lmidist_jax and pallas_kernels (paths and contents)."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for package in _SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _environment() -> dict:
    import jaxlib

    device = jax.devices()[0]
    return {"format": FORMAT, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "platform": device.platform, "platform_version": device.client.platform_version,
            "device_kind": device.device_kind, "num_devices": jax.device_count(),
            "num_processes": jax.process_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            # Switches read while tracing (LMIDIST_FUSED_OPS, LMIDIST_QUANT_IMPL, ...).
            "lmidist_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LMIDIST_")},
            "x64": bool(jax.config.jax_enable_x64),
            "matmul_precision": str(jax.config.jax_default_matmul_precision),
            "sources": source_hash()}


def _signature(args) -> dict:
    """Structure, shapes, dtypes, shardings of the step's arguments (what the program was compiled for)."""
    leaves, treedef = jax.tree_util.tree_flatten((tuple(args), {}))
    avals = [(tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)),
              str(getattr(x, "sharding", ""))) for x in leaves]
    return {"treedef": str(treedef), "avals": avals}


def _devices(args):
    """The devices the step runs on, in its device assignment's order (its arguments'
    mesh), or None when no argument says. An executable must be loaded onto exactly
    these: by default deserialization takes every device of the process, which aborts
    (an XLA check, not an exception) for a mesh smaller than the process's devices."""
    for leaf in jax.tree_util.tree_leaves((tuple(args), {})):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            continue
        devices = getattr(sharding, "_device_assignment", None)
        return list(devices) if devices else sorted(sharding.device_set, key=lambda d: d.id)
    return None


_fresh_lock = threading.Lock()
_fresh_users = 0
_fresh_saved = True


@contextmanager
def fresh_compiles():
    """JAX's persistent compilation cache off while compiling what is stored here: an
    executable that JAX loaded from its own cache serializes to a copy that fails to run
    (XLA:CPU, jax 0.11: "Function select_concatenate_fusion.3 not found"), so stored
    steps are compiled afresh. Nests across threads (warm-up compiles in parallel)."""
    from jax.experimental.compilation_cache import compilation_cache

    global _fresh_users, _fresh_saved
    with _fresh_lock:
        if _fresh_users == 0:
            _fresh_saved = bool(jax.config.jax_enable_compilation_cache)
            jax.config.update("jax_enable_compilation_cache", False)
            compilation_cache.reset_cache()  # JAX remembers whether its cache is in use
        _fresh_users += 1
    try:
        yield
    finally:
        with _fresh_lock:
            _fresh_users -= 1
            if _fresh_users == 0:
                jax.config.update("jax_enable_compilation_cache", _fresh_saved)
                compilation_cache.reset_cache()


class ExecutableCache:
    """Compiled steps of one program family (``program``: a JSON-able description of
    what shapes the step besides its arguments) under ``directory``."""

    def __init__(self, directory: str | os.PathLike, program: dict):
        self.directory = Path(directory)
        self._base = {"environment": _environment(), "program": program}
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_jax_config(cls, program: dict) -> "ExecutableCache | None":
        """The cache inside JAX's compilation cache directory; None when that is off or
        when several processes run one program (each would load its own copy)."""
        base = jax.config.jax_compilation_cache_dir
        if not base or jax.process_count() > 1:
            return None
        return cls(os.path.join(base, SUBDIR), program)

    def _key(self, bucket, args) -> tuple[str, bytes]:
        devices = [d.id for d in _devices(args) or ()]
        text = json.dumps({**self._base, "bucket": list(bucket), "args": _signature(args), "devices": devices},
                          sort_keys=True, default=str).encode()
        return hashlib.sha256(text).hexdigest(), text

    def load(self, bucket, args):
        """The compiled step of ``bucket`` for these arguments, or None (miss, or an
        unreadable / stale entry)."""
        from jax.experimental.serialize_executable import deserialize_and_load

        devices = _devices(args)
        if devices is None:
            self.misses += 1
            return None
        name, key_text = self._key(bucket, args)
        path = self.directory / f"{name}.exe"
        try:
            with open(path, "rb") as f:
                stored_key, serialized, out_tree = pickle.load(f)
            if stored_key != key_text:
                raise ValueError("the entry's key differs from its name's")
            in_tree = jax.tree_util.tree_structure((tuple(args), {}))
            compiled = deserialize_and_load(serialized, in_tree, out_tree, execution_devices=devices)
        except FileNotFoundError:
            self.misses += 1
            return None
        except Exception as e:  # noqa: BLE001 - a damaged entry must only cost a compile
            logger.debug("executable cache entry %s not used (%s: %s)", path, type(e).__name__, e)
            self.misses += 1
            return None
        self.hits += 1
        return compiled

    def store(self, bucket, args, compiled) -> None:
        """Writes the entry (atomically); a failure is logged at debug and ignored."""
        from jax.experimental.serialize_executable import serialize

        if _devices(args) is None:
            return
        name, key_text = self._key(bucket, args)
        tmp = None
        try:
            serialized, _, out_tree = serialize(compiled)
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=f".{name}.", suffix=".tmp",
                                             delete=False) as f:
                tmp = f.name
                pickle.dump((key_text, serialized, out_tree), f, protocol=pickle.HIGHEST_PROTOCOL)
            os.chmod(tmp, 0o644)  # readable as JAX's own entries are (a temp file is private)
            os.replace(tmp, self.directory / f"{name}.exe")
            tmp = None
        except Exception as e:  # noqa: BLE001 - caching is an optimisation
            logger.debug("executable cache entry %s not written (%s: %s)", name, type(e).__name__, e)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

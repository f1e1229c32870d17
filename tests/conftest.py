"""Suite-wide set-up: one JAX persistent compilation cache for the whole test suite
(subprocesses included, through the environment), under .pytest_cache/ instead of the
user's cache beside the models. Engines built with the default
``compilation_cache_dir=auto`` keep a directory JAX was already given, so they use this
one; a step bucket compiled by one test (or an earlier run) is then loaded, not
recompiled.

The jaxtyping annotations of the array boundaries are checked at run time (beartype) in
the modules that carry them, for every test of this process (subprocesses are not
checked); tests/test_array_types.py shows a wrong shape failing. LMIDIST_TEST_TYPECHECK=0
turns the checks off (to measure what they cost; test_array_types.py then fails).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jaxtyping import install_import_hook

TEST_COMPILATION_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax_compilation_cache"

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(TEST_COMPILATION_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Every function and dataclass of these modules is checked, so only modules whose
# annotations are meant as contracts are listed (elsewhere annotations are documentation:
# tests pass duck-typed specs, ints for floats).
TYPE_CHECKED_MODULES = [
    "lmidist_jax.models.step_metadata",
    "lmidist_jax.models.decoder",
    "lmidist_jax.models.attention",
    "lmidist_jax.models.layers",
    "lmidist_jax.models.linear",
    "lmidist_jax.models.quantized",
    "lmidist_jax.models.lora_linear",
    "lmidist_jax.models.moe",
    "lmidist_jax.models.rope",
    "lmidist_jax.engine.sampler",
    "lmidist_jax.engine.model_runner",
    "pallas_kernels",
]
TYPE_CHECKS = os.environ.get("LMIDIST_TEST_TYPECHECK", "1") != "0"
if TYPE_CHECKS:
    assert not any(name in sys.modules for name in TYPE_CHECKED_MODULES), "imported before the type-check hook"
    install_import_hook(TYPE_CHECKED_MODULES, "beartype.beartype")

import jax  # noqa: E402  (after the environment: jax reads it at import)
import pytest  # noqa: E402

if jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture
def restore_jax_cache_dir():
    """For tests that move JAX's compilation cache directory: gives the suite's back afterwards."""
    from lmidist_jax.engine.factory import configure_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    yield
    configure_compilation_cache(before)

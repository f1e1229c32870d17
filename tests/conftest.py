"""Suite-wide set-up: one JAX persistent compilation cache for the whole test suite
(subprocesses included, through the environment), under .pytest_cache/ instead of the
user's cache beside the models. Engines built with the default
``compilation_cache_dir=auto`` keep a directory JAX was already given, so they use this
one; a step bucket compiled by one test (or an earlier run) is then loaded, not
recompiled."""

from __future__ import annotations

import os
from pathlib import Path

TEST_COMPILATION_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax_compilation_cache"

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(TEST_COMPILATION_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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

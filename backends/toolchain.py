"""Compiling generated C++ with the system g++, cached by content hash, and loading it.

The cache key is sha256 over the source, the flags, the compiler's version line and the tier,
so a cached library is reused only for exactly what produced it.  A library is built into a
temporary file and moved into place with os.replace, so concurrent builds of the same source
(test workers, two engines) never see a half-written file.  No fast-math flags: in a shared
library gcc links crtfastmath, whose constructor sets FTZ/DAZ in the loading process and would
change numpy's results (and decode E4M3 subnormal scales as 0) — research/amx_nf4.md §6.3.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

INCLUDE = Path(__file__).parent / "include"
BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno",
              "-fno-trapping-math", "-ffp-contract=off", f"-I{INCLUDE}"]
TIER_FLAGS = {
    "ref": ["-march=x86-64"],
    "avx2": ["-march=x86-64-v3"],                      # avx2 fma f16c bmi2
    "avx512": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16"],
    "amx": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8"],
    "amx-emulated": ["-march=x86-64-v3", "-DAMX_EMULATE"],
}


class BuildError(RuntimeError):
    """g++ refused generated code; carries the compiler's message and the source path."""


def cache_dir() -> Path:
    root = Path(os.environ.get("AMXC_CACHE", Path.home() / ".cache" / "amxc"))
    path = root / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=1)
def compiler_version() -> str:
    try:
        out = subprocess.run(["g++", "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"g++ is needed to build native kernels and was not found ({e}); "
                         f"install g++ or run with AMXC_ISA=ref on the interpreter") from None
    return out.stdout.splitlines()[0]


def flags(tier: str) -> list[str]:
    return BASE_FLAGS + TIER_FLAGS[tier]


def headers_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(INCLUDE.glob("*.h")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def build(source: str, tier: str, name: str = "model", *, compile_only: bool = False) -> Path:
    """The shared library (or, compile_only, the object file) of `source` for `tier`, from the
    cache if it was built before."""
    args = flags(tier)
    if compile_only:
        args = [a for a in args if a != "-shared"] + ["-c"]
    key = hashlib.sha256("\0".join([source, " ".join(args), compiler_version(), tier,
                                    headers_digest()]).encode()).hexdigest()[:24]
    out = cache_dir() / f"{name}-{tier}-{key}{'.o' if compile_only else '.so'}"
    if out.exists():
        return out
    src = cache_dir() / f"{name}-{tier}-{key}.cpp"
    src.write_text(source)
    fd, tmp = tempfile.mkstemp(dir=cache_dir(), suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run(["g++", *args, str(src), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"g++ failed on {src} ({tier}):\n{proc.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(path: Path) -> ctypes.CDLL:
    return ctypes.CDLL(str(path))

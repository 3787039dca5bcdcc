"""Compiling generated C++ with the system g++, cached by content hash, and loading it.

The cache key is sha256 over the source, the flags, the compiler's version line and the tier,
so a cached library is reused only for exactly what produced it.  A library is built into a
temporary file and moved into place with os.replace, so concurrent builds of the same source
(test workers, two engines) never see a half-written file.  No fast-math flags: in a shared
library gcc links crtfastmath, whose constructor sets FTZ/DAZ in the loading process and would
change numpy's results (and decode E4M3 subnormal scales as 0) — research/amx_nf4.md §6.3.

The cache is not trusted blindly: its libraries run in this process.  Its directories must be
this user's and writable by no one else (CacheError otherwise), and everything in it is 0o600.
Each library's sha256 is recorded beside it (`<lib>.sha256`) when it is built; build() rebuilds
one that does not match (truncated, overwritten, no record), and load() checks the bytes it
read and dlopens a private, unlinked copy of exactly those bytes, so a change to the cached
file after the check (or while it is mapped, SIGBUS) never reaches the loaded code.
"""
from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import isa

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


class CacheError(RuntimeError):
    """The kernel cache can't be used safely: not creatable or writable, shared with other users,
    or a cached library that changed after it was checked."""


def cache_dir(part: str = "kernels") -> Path:
    """$AMXC_CACHE/<part> or ~/.cache/amxc/<part> (kernels; runtime/verified.py keeps its records
    in "verified"), created private (0o700).  One another user owns or can write is refused:
    whoever can write it chooses the code this process loads, or which files it trusts."""
    root = Path(os.environ.get("AMXC_CACHE") or Path.home() / ".cache" / "amxc")
    path = root / part
    what = "the kernel cache" if part == "kernels" else f"amxc's cache ({part})"
    for d in (root, path):
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = d.stat()
        except OSError as e:
            raise CacheError(f"cannot use {d} for {what} ({e.strerror or e}); make it a "
                             f"directory of yours or set AMXC_CACHE to one") from None
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise CacheError(f"refusing {what} {d}: it is owned by uid {st.st_uid} with mode "
                             f"{st.st_mode & 0o777:o}, so others could plant code that amxc loads; "
                             f"`chmod go-w {d}` if it is yours, or set AMXC_CACHE to a private directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise CacheError(f"cannot write {what} {path}; make it writable or set AMXC_CACHE")
    return path


@functools.lru_cache(maxsize=1)
def compiler_version() -> str:
    try:
        out = subprocess.run(["g++", "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"g++ is needed to build native kernels and was not found ({e}); "
                         f"install g++, or set AMXC_EXECUTOR=interpreter to run on the reference interpreter") from None
    return out.stdout.splitlines()[0]


def flags(tier: str) -> list[str]:
    return BASE_FLAGS + TIER_FLAGS[tier] + (["-mavxvnni"] if isa.avx_vnni(tier) else [])


def headers_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(INCLUDE.glob("*.h")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def build(source: str, tier: str, name: str = "model", *, compile_only: bool = False) -> Path:
    """The shared library (or, compile_only, the object file) of `source` for `tier`, from the
    cache if it was built before and still matches its recorded sha256."""
    args = flags(tier)
    if compile_only:
        args = [a for a in args if a != "-shared"] + ["-c"]
    key = hashlib.sha256("\0".join([source, " ".join(args), compiler_version(), tier,
                                    headers_digest()]).encode()).hexdigest()[:24]
    cache = cache_dir()
    stem = cache / f"{name}-{tier}-{key}"
    out, src = Path(f"{stem}{'.o' if compile_only else '.so'}"), Path(f"{stem}.cpp")
    # The source file doubles as the key's lock: concurrent builds of one key (test workers, two
    # engines) take turns, so none reads a half-rewritten source or pairs a library with the
    # other's hash record.  The lock goes with the descriptor.
    fd = os.open(src, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _verified(out) is not None:
            return out
        if out.exists():
            print(f"amxc: warning: cached kernel {out} does not match its recorded sha256 (truncated, "
                  f"overwritten or unrecorded); rebuilding it", file=sys.stderr)
        os.fchmod(fd, 0o600)                         # a source an older amxc left world-readable
        os.ftruncate(fd, 0)
        os.pwrite(fd, source.encode(), 0)
        fd_tmp, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
        os.close(fd_tmp)
        try:
            proc = subprocess.run(["g++", *args, str(src), "-o", tmp], capture_output=True, text=True)
            if proc.returncode != 0:
                raise BuildError(f"g++ failed on {src} ({tier}):\n{proc.stderr[-4000:]}")
            os.chmod(tmp, 0o600)                     # the linker recreates its output with the umask's mode
            _write_atomic(_record(out), hashlib.sha256(Path(tmp).read_bytes()).hexdigest().encode(), cache)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    finally:
        os.close(fd)
    return out


_loaded: dict[str, ctypes.CDLL] = {}


def load(path: Path) -> ctypes.CDLL:
    """The library at `path`, loaded from a private copy of bytes that matched its recorded
    sha256 (CacheError if they don't).  The same bytes load once per process, as dlopen of one
    path did, so the profile counters a second load() reads are the first one's."""
    data = _verified(Path(path))
    if data is None:
        raise CacheError(f"cached kernel {path} does not match its recorded sha256 (it changed after "
                         f"it was built); build it again")
    digest = hashlib.sha256(data).hexdigest()
    if digest not in _loaded:
        # Check and use are one read: dlopen maps the copy, which nothing else can reach, and it
        # is unlinked at once (the mapping keeps it).  A unique name keeps glibc, which
        # recognizes loaded libraries by path, from handing back an earlier one.
        fd, tmp = tempfile.mkstemp(dir=cache_dir(), prefix=".load-", suffix=".so")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            _loaded[digest] = ctypes.CDLL(tmp)
        finally:
            os.unlink(tmp)
    return _loaded[digest]


def _record(path: Path) -> Path:
    return Path(f"{path}.sha256")


def _verified(path: Path) -> bytes | None:
    """The bytes of `path` if they hash to its record, else None (missing, unreadable, changed)."""
    try:
        data, recorded = path.read_bytes(), _record(path).read_text().strip()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == recorded else None


def _write_atomic(path: Path, data: bytes, cache: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")       # 0o600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise

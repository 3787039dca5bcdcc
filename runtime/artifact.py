"""Compiled artifacts: a directory that holds everything needed to run a model, and nothing that
runs by itself.

    ART/manifest.json   format version, source digest, pipeline, config, parameter index, hashes
    ART/graph.ir        the final IR in its text form (parsed by amxc's own parser)
    ART/weights.bin     raw little-endian tensors, each 64-byte aligned, memory-mapped at load
    ART/weights.rankR.bin  instead, for a module sharded N ways (shard-tp): one file per rank
                        with that rank's slices and its own copy of the replicated tensors, at
                        the same offsets in every file, so each rank maps only its own file
    ART/tokenizer/      tokenizer files (JSON / sentencepiece), if the model has them

Loading reads JSON, IR text and raw bytes only — never pickle, never code — and opens only the
files the manifest lists.  The manifest carries its own digest and every listed file's sha256, so
a truncated, corrupted or edited artifact is rejected with the name of the file; the parameter
index is checked against graph.ir and the size of weights.bin before any byte is mapped.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from amxc.ir import Module, digest_of, parse_module, print_module, verify
from amxc.ir.errors import ParseError, VerifyError

FORMAT = "amxc-artifact"
FORMAT_VERSION = 2      # 2: manifest_digest
ALIGN = 64
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ArtifactError(ValueError):
    pass


def _sha256_file(path: Path, bar=None, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without the
    `manifest_digest` field: file hashes protect the other files, this protects the manifest."""
    body = {k: v for k, v in manifest.items() if k != "manifest_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_output(out: str | os.PathLike) -> Path:
    """The path `save_artifact` will write for `out`, absolute, after checking that whatever is
    there may be replaced: nothing, an empty directory, or an amxc artifact.  Raises ArtifactError
    otherwise.  Cheap, so callers run it before any slow work (tracing, passes)."""
    out = Path(out)
    # resolve the parent's links but not the last component's: that one is refused if a link
    target = out.resolve() if out.name in ("", "..") else out.parent.resolve() / out.name
    if os.path.lexists(target) and (why := _refusal(target)):
        raise ArtifactError(f"refusing to write the artifact to {target}: {why}")
    return target


def _refusal(path: Path) -> str | None:
    """Why the existing `path` must not be removed to make room for an artifact, or None."""
    if path.is_symlink():              # replacing it would act on wherever it points
        return "it is a symbolic link (give the directory itself)"
    if not path.is_dir():
        return "it exists and is not a directory (choose another -o, or remove it yourself)"
    real = path.resolve()
    try:
        cwd = Path.cwd().resolve()
    except OSError:                    # the current directory was removed
        cwd = None
    if cwd is not None and (real == cwd or real in cwd.parents):   # `-o .`, `-o ..`, `-o /`
        return "it is the current directory or one of its parents"
    if real == Path(os.path.expanduser("~")).resolve():
        return "it is your home directory"
    if real == Path(real.anchor):
        return "it is the root directory"
    if next(path.iterdir(), None) is not None and not _is_artifact(path):
        return "it exists and is not an amxc artifact (choose another -o, or remove it yourself)"
    return None


def _is_artifact(path: Path) -> bool:
    """Whether `path` holds an amxc manifest: enough to know it is ours to replace, without
    requiring that it still load (an older format version or a damaged one is replaced too)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def save_artifact(module: Module, out: str | os.PathLike, *, config: dict | None = None,
                  pipeline: str = "", write_tokenizer: Callable[[Path], bool] | None = None,
                  progress: bool = True, extra: dict | None = None) -> Path:
    """Stream the module's weights (one tensor in memory at a time) and write the artifact.

    `out` must be free, an empty directory or an earlier artifact (check_output).  The artifact
    is built in a fresh directory beside `out` and swapped into place at the end, so a failed or
    interrupted compile leaves neither a half-written artifact nor a damaged old one.  Returns
    the absolute path written."""
    target = check_output(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    # ours alone (unique name, created here): the only directory removed if anything fails
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        tp = module.attrs.get("tp", 1)
        index, sharding = _write_weights(module, tmp, tp, progress)
        (tmp / "graph.ir").write_text(print_module(module))
        has_tokenizer = bool(write_tokenizer and write_tokenizer(tmp / "tokenizer"))
        files = {str(p.relative_to(tmp)): _sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "amxc_version": _version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": module.name,
            "source_digest": source_digest(module, config),
            "pipeline": pipeline,
            "target": module.attrs.get("target", "auto"),
            "required_isa": [t] if (t := module.attrs.get("target", "auto")) != "auto" else ["ref"],
            "config": config or {},
            "tokenizer": has_tokenizer,
            "params": index,
            "files": files,
            **({"tp": tp, "sharding": sharding} if tp > 1 else {}),
            **(extra or {}),
        }
        manifest["manifest_digest"] = manifest_digest(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.chmod(0o777 & ~_umask())   # mkdtemp makes it 0700; an artifact gets the usual mode
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _install(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _install(new: Path, target: Path) -> Path | None:
    """Move the finished directory `new` to `target`, removing `new` if that fails.  What is at
    `target` must pass _refusal; it is swapped out atomically where the kernel can, and the
    directory now holding it is returned, for the caller to remove (None if there was none)."""
    try:
        check_output(target)           # again: writing took a while, the target may have changed
        if not os.path.lexists(target):
            os.rename(new, target)     # replaces at most an empty directory made meanwhile
            return None
        if _exchange(new, target):
            old = aside = new
        else:                          # not atomic: for a moment `target` does not exist
            aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            old = aside / "old"
            os.rename(target, old)
            try:
                os.rename(new, target)
            except BaseException:
                os.rename(old, target)
                os.rmdir(aside)
                raise
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    # check what was moved out, after the move, so that a directory put at `target` since the
    # check above is handed back rather than removed (if moving it back fails, nothing is removed)
    if why := _refusal(old):
        if old == new:                 # exchanged: exchange back
            _exchange(new, target)
        else:
            os.rename(target, new)
            os.rename(old, target)
            os.rmdir(aside)
        shutil.rmtree(new, ignore_errors=True)
        raise ArtifactError(f"refusing to write the artifact to {target}: {why}")
    return aside


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2      # <fcntl.h>, <linux/fs.h>


@functools.cache
def _renameat2():
    """libc's renameat2, or None (not Linux, or a C library without it)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths `a` and `b`; False where the system cannot (then nothing moved)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):      # an old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def weight_files(tp: int) -> list[str]:
    """The weight files of an artifact sharded `tp` ways (1: not sharded), in rank order."""
    return ["weights.bin"] if tp == 1 else [f"weights.rank{r}.bin" for r in range(tp)]


def _write_weights(module: Module, art: Path, tp: int, progress: bool) -> tuple[dict, dict]:
    """Every rank's file, one tensor in memory at a time; returns the parameter index (the same
    offsets in every file) and, sharded, the plan: which parameters are split and how."""
    from tqdm import tqdm

    index, sharding = {}, {}
    total = sum(p.type.nbytes() for p in module.params.values()) * tp
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress,
               file=sys.stderr, leave=False)
    files = [open(art / name, "wb") for name in weight_files(tp)]
    try:
        offset = 0
        for p in module.params.values():
            pad = (-offset) % ALIGN
            offset += pad
            digests = []
            for r, f in enumerate(files):
                arr = np.ascontiguousarray(p.load(r) if p.sharded else p.load())
                f.write(b"\0" * pad)
                f.write(arr.data)
                digests.append(digest_of(arr))
                bar.update(arr.nbytes)
                if not p.sharded:
                    for g in files[1:]:              # the replicated tensor in every rank's file
                        g.write(b"\0" * pad)
                        g.write(arr.data)
                        bar.update(arr.nbytes)
                    break
            p.digest = digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()[:16]
            index[p.name] = {"offset": offset, "nbytes": arr.nbytes, "dtype": str(p.type.dtype),
                             "shape": list(arr.shape)}
            if p.sharded:
                sharding[p.name] = {"split": p.attrs.get("tp", "split"), "bytes_per_rank": arr.nbytes}
            offset += arr.nbytes
    finally:
        for f in files:
            f.close()
        bar.close()
    return index, sharding


def source_digest(module: Module, config: dict | None) -> str:
    """sha256 over the config and every parameter's content digest: what the model *is*."""
    h = hashlib.sha256(json.dumps(config or {}, sort_keys=True, default=str).encode())
    for name in sorted(module.params):
        h.update(f"{name}:{module.params[name].digest}".encode())
    return h.hexdigest()


def _version() -> str:
    from amxc import __version__
    return __version__


def read_manifest(art: str | os.PathLike) -> dict:
    """The artifact's manifest, checked: JSON, format, version, and its own digest."""
    art = Path(art)
    path = art / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{art}: not an amxc artifact (manifest.json is missing)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an amxc artifact manifest")
    # the version before the digest: a newer format may digest differently, and "recompile"
    # is the useful message then
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')} is not supported "
                            f"by this amxc (reads version {FORMAT_VERSION}); recompile the model")
    if manifest.get("manifest_digest") != manifest_digest(manifest):
        raise ArtifactError(f"{path}: edited or corrupted (digest mismatch)")
    for key, kind in (("config", dict), ("tokenizer", bool)):    # params, files: checked where read
        if key in manifest and not isinstance(manifest[key], kind):
            raise ArtifactError(f"{path}: '{key}' must be a JSON {'object' if kind is dict else 'boolean'}, "
                                f"found {type(manifest[key]).__name__}")
    return manifest


def load_artifact(art: str | os.PathLike, *, check_hashes: bool = True,
                  progress: bool = False, rank: int | None = None) -> tuple[Module, dict]:
    """Parse and verify an artifact; parameters are memory-mapped views of weights.bin.
    `progress` shows a bar (stderr) while hashing, which takes seconds for large weights.
    A sharded artifact's split parameters get one loader per rank; `rank` (a rank process)
    verifies and maps that rank's weight file only, and replicated parameters read from it."""
    art = Path(art)
    manifest = read_manifest(art)
    tp = manifest.get("tp", 1)
    if not _is_int(tp) or not 1 <= tp <= 8:
        raise ArtifactError(f"{art / 'manifest.json'}: 'tp' must be an integer from 1 to 8, found {tp!r}")
    if rank is not None and not 0 <= rank < tp:
        raise ArtifactError(f"{art}: rank {rank} of an artifact with {tp} rank(s)")
    files = _listed_files(art, manifest, tp)
    if check_hashes:
        skip = {art / f for r, f in enumerate(weight_files(tp)) if rank is not None and r != rank}
        _check_hashes({p: d for p, d in files.items() if p not in skip}, progress)
    graph = art / "graph.ir"
    try:
        module = parse_module(graph.read_text(encoding="utf-8"), filename=str(graph))
        verify(module)
    except (ParseError, VerifyError) as e:
        raise ArtifactError(str(e)) from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{graph}: not readable IR text ({e})") from None
    if module.attrs.get("tp", 1) != tp:
        raise ArtifactError(f"{graph}: the module is sharded {module.attrs.get('tp', 1)} way(s) and the "
                            f"manifest says {tp}")
    _attach_weights(module, manifest.get("params"), art, tp, manifest.get("sharding", {}), rank)
    return module, manifest


def _listed_files(art: Path, manifest: dict, tp: int = 1) -> dict[Path, str]:
    """The manifest's file list as {path: sha256}; every path a file inside the artifact."""
    where = art / "manifest.json"
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{where}: 'files' must be an object of path -> sha256")
    for required in ("graph.ir", *weight_files(tp)):
        if required not in files:
            raise ArtifactError(f"{where}: does not list {required}")
    root, listed = art.resolve(), {}
    for rel, digest in files.items():
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            raise ArtifactError(f"{where}: the hash of {rel!r} is not a sha256 hex digest")
        path = art / rel
        if not path.resolve().is_relative_to(root):     # "../x", "/etc/x", links that lead out
            raise ArtifactError(f"{where}: lists {rel!r}, which is outside the artifact")
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        listed[path] = digest
    return listed


def _check_hashes(files: dict[Path, str], progress: bool) -> None:
    from tqdm import tqdm

    from . import verified

    total = sum(path.stat().st_size for path in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking hashes", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        for path, digest in files.items():       # a file verified before, unchanged since, is not hashed
            if not verified.check(path, digest, lambda p: _sha256_file(p, bar)):
                raise ArtifactError(f"{path}: content does not match the manifest's sha256 "
                                    f"(corrupted or modified)")


def _attach_weights(module: Module, index, art: Path, tp: int = 1, sharding=None, rank: int | None = None) -> None:
    """Point every parameter at its bytes in the weight file(s), after checking its index entry."""
    where = art / "manifest.json"
    if not isinstance(index, dict):
        raise ArtifactError(f"{where}: 'params' must be an object of parameter -> entry")
    if unknown := sorted(set(index) - set(module.params)):
        raise ArtifactError(f"{where}: parameter index names @{unknown[0]}, which graph.ir does not "
                            f"declare")
    if not isinstance(sharding, dict) or (unknown := sorted(set(sharding) - set(module.params))):
        raise ArtifactError(f"{where}: 'sharding' must name parameters of graph.ir")
    # np.memmap refuses empty files; a module without parameters has one
    files = [art / name for name in weight_files(tp)]
    weights: list[np.ndarray | None] = [None] * tp

    def mapped(r: int) -> np.ndarray:         # a rank's file when first read (the oracle maps all)
        if weights[r] is None:
            weights[r] = (np.memmap(files[r], dtype=np.uint8, mode="r") if files[r].stat().st_size
                          else np.zeros(0, np.uint8))
        return weights[r]

    for name, p in module.params.items():
        if name not in index:
            raise ArtifactError(f"{where}: no weights for parameter @{name}")
        label = f"{where}: parameter @{name}"
        if name in sharding:
            views = [_view(mapped(r), index[name], p, label, files[r].name) if rank is None or r == rank else _elsewhere(name, r)
                     for r in range(tp)]
            p.loader, p.shards = None, views
        else:
            p.loader = _view(mapped(rank or 0), index[name], p, label, files[rank or 0].name)


def _elsewhere(name: str, r: int):
    def load():
        raise ArtifactError(f"@{name}: rank {r}'s slice is in its own weight file, which this rank did not map")
    return load


def _view(weights: np.ndarray, entry, param, where: str, fname: str = "weights.bin"):
    """A loader for one parameter; `where` prefixes every error."""
    if not isinstance(entry, dict):
        raise ArtifactError(f"{where}: index entry must be an object")
    if not param.type.is_static():
        raise ArtifactError(f"{where}: graph.ir gives it a symbolic shape {param.type}")
    dtype = param.type.dtype.storage
    try:
        shape = tuple(param.type.storage_shape())
    except ValueError as e:                   # an nf4 type whose encoding makes no sense
        raise ArtifactError(f"{where}: {e}") from None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    offset = entry.get("offset")
    if not _is_int(offset) or offset < 0 or offset % ALIGN:
        raise ArtifactError(f"{where}: offset {offset!r} is not a non-negative multiple of {ALIGN}")
    if entry.get("dtype") != str(param.type.dtype):
        raise ArtifactError(f"{where}: dtype {entry.get('dtype')!r} differs from graph.ir's "
                            f"{param.type.dtype}")
    if entry.get("shape") != list(shape):
        raise ArtifactError(f"{where}: shape {entry.get('shape')!r} differs from graph.ir's {list(shape)}")
    if not _is_int(entry.get("nbytes")) or entry["nbytes"] != nbytes:
        raise ArtifactError(f"{where}: nbytes {entry.get('nbytes')!r} should be {nbytes}")
    if offset + nbytes > weights.size:
        raise ArtifactError(f"{where}: bytes [{offset}, {offset + nbytes}) lie outside {fname} "
                            f"({weights.size} bytes)")

    def load():
        return weights[offset:offset + nbytes].view(dtype).reshape(shape)
    return load


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

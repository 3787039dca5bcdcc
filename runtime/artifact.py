"""Compiled artifacts: a directory that holds everything needed to run a model, and nothing that
runs by itself.

    ART/manifest.json   format version, source digest, pipeline, config, parameter index, hashes
    ART/graph.ir        the final IR in its text form (parsed by amxc's own parser)
    ART/weights.bin     raw little-endian tensors, each 64-byte aligned, memory-mapped at load
    ART/tokenizer/      tokenizer files (JSON / sentencepiece), if the model has them

Loading reads JSON, IR text and raw bytes only — never pickle, never code — and opens only the
files the manifest lists.  The manifest carries its own digest and every listed file's sha256, so
a truncated, corrupted or edited artifact is rejected with the name of the file; the parameter
index is checked against graph.ir and the size of weights.bin before any byte is mapped.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
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


def save_artifact(module: Module, out: str | os.PathLike, *, config: dict | None = None,
                  pipeline: str = "", write_tokenizer: Callable[[Path], bool] | None = None,
                  progress: bool = True, extra: dict | None = None) -> Path:
    """Stream the module's weights (one tensor in memory at a time) and write the artifact.

    The directory is built beside `out` and moved into place at the end, so a failed compile
    never leaves a half-written artifact behind."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        index = _write_weights(module, tmp / "weights.bin", progress)
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
            **(extra or {}),
        }
        manifest["manifest_digest"] = manifest_digest(manifest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_weights(module: Module, path: Path, progress: bool) -> dict:
    from tqdm import tqdm

    index, offset = {}, 0
    total = module.param_bytes()
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress,
               file=sys.stderr, leave=False)
    with open(path, "wb") as f:
        for p in module.params.values():
            arr = np.ascontiguousarray(p.load())
            pad = (-offset) % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(arr.data)
            p.digest = digest_of(arr)
            index[p.name] = {"offset": offset, "nbytes": arr.nbytes, "dtype": str(p.type.dtype),
                             "shape": list(arr.shape)}
            offset += arr.nbytes
            bar.update(arr.nbytes)
    bar.close()
    return index


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
    return manifest


def load_artifact(art: str | os.PathLike, *, check_hashes: bool = True,
                  progress: bool = False) -> tuple[Module, dict]:
    """Parse and verify an artifact; parameters are memory-mapped views of weights.bin.
    `progress` shows a bar (stderr) while hashing, which takes seconds for large weights."""
    art = Path(art)
    manifest = read_manifest(art)
    files = _listed_files(art, manifest)
    if check_hashes:
        _check_hashes(files, progress)
    graph = art / "graph.ir"
    try:
        module = parse_module(graph.read_text(encoding="utf-8"), filename=str(graph))
        verify(module)
    except (ParseError, VerifyError) as e:
        raise ArtifactError(str(e)) from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{graph}: not readable IR text ({e})") from None
    _attach_weights(module, manifest.get("params"), art)
    return module, manifest


def _listed_files(art: Path, manifest: dict) -> dict[Path, str]:
    """The manifest's file list as {path: sha256}; every path a file inside the artifact."""
    where = art / "manifest.json"
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{where}: 'files' must be an object of path -> sha256")
    for required in ("graph.ir", "weights.bin"):
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

    total = sum(path.stat().st_size for path in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="checking hashes", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        for path, digest in files.items():
            if _sha256_file(path, bar) != digest:
                raise ArtifactError(f"{path}: content does not match the manifest's sha256 "
                                    f"(corrupted or modified)")


def _attach_weights(module: Module, index, art: Path) -> None:
    """Point every parameter at its bytes in weights.bin, after checking its index entry."""
    where = art / "manifest.json"
    if not isinstance(index, dict):
        raise ArtifactError(f"{where}: 'params' must be an object of parameter -> entry")
    if unknown := sorted(set(index) - set(module.params)):
        raise ArtifactError(f"{where}: parameter index names @{unknown[0]}, which graph.ir does not "
                            f"declare")
    path = art / "weights.bin"
    # np.memmap refuses empty files; a module without parameters has one
    weights = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    for name, p in module.params.items():
        if name not in index:
            raise ArtifactError(f"{where}: no weights for parameter @{name}")
        p.loader = _view(weights, index[name], p, f"{where}: parameter @{name}")


def _view(weights: np.ndarray, entry, param, where: str):
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
        raise ArtifactError(f"{where}: bytes [{offset}, {offset + nbytes}) lie outside weights.bin "
                            f"({weights.size} bytes)")

    def load():
        return weights[offset:offset + nbytes].view(dtype).reshape(shape)
    return load


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

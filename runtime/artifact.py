"""Compiled artifacts: a directory that holds everything needed to run a model, and nothing that
runs by itself.

    ART/manifest.json   format version, source digest, pipeline, config, parameter index, hashes
    ART/graph.ir        the final IR in its text form (parsed by amxc's own parser)
    ART/weights.bin     raw little-endian tensors, each 64-byte aligned, memory-mapped at load
    ART/tokenizer/      tokenizer files (JSON / sentencepiece), if the model has them

Loading reads JSON, IR text and raw bytes only — never pickle, never code — and checks every
file's sha256 against the manifest, so a truncated, corrupted or edited artifact is rejected with
the name of the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from amxc.ir import Module, digest_of, parse_module, print_module, verify
from amxc.ir.errors import ParseError, VerifyError

FORMAT = "amxc-artifact"
FORMAT_VERSION = 1
ALIGN = 64


class ArtifactError(ValueError):
    pass


def _sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
            "required_isa": ["ref"],
            "config": config or {},
            "tokenizer": has_tokenizer,
            "params": index,
            "files": files,
            **(extra or {}),
        }
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
    art = Path(art)
    path = art / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{art}: not an amxc artifact (manifest.json is missing)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an amxc artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')} is not supported "
                            f"by this amxc (reads version {FORMAT_VERSION}); recompile the model")
    return manifest


def load_artifact(art: str | os.PathLike, *, check_hashes: bool = True) -> tuple[Module, dict]:
    """Parse and verify an artifact; parameters are memory-mapped views of weights.bin."""
    art = Path(art)
    manifest = read_manifest(art)
    files = manifest.get("files", {})
    for required in ("graph.ir", "weights.bin"):
        if required not in files:
            raise ArtifactError(f"{art / 'manifest.json'}: does not list {required}")
    for rel, digest in files.items():
        path = art / rel
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if check_hashes and _sha256_file(path) != digest:
            raise ArtifactError(f"{path}: content does not match the manifest's sha256 "
                                f"(corrupted or modified)")
    try:
        module = parse_module((art / "graph.ir").read_text(), filename=str(art / "graph.ir"))
        verify(module)
    except (ParseError, VerifyError) as e:
        raise ArtifactError(str(e)) from None
    weights = np.memmap(art / "weights.bin", dtype=np.uint8, mode="r")
    index = manifest.get("params", {})
    for name, p in module.params.items():
        entry = index.get(name)
        if entry is None:
            raise ArtifactError(f"{art / 'manifest.json'}: no weights for parameter @{name}")
        p.loader = _view(weights, entry, p, art)
    return module, manifest


def _view(weights: np.memmap, entry: dict, param, art: Path):
    dtype = param.type.dtype.storage
    shape = tuple(param.type.concrete_shape({}))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    offset = entry["offset"]
    if entry["nbytes"] != nbytes or offset % ALIGN or offset + nbytes > weights.size:
        raise ArtifactError(f"{art / 'manifest.json'}: bad weights entry for @{param.name}")

    def load():
        return weights[offset:offset + nbytes].view(dtype).reshape(shape)
    return load

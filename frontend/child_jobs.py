"""The frontend's transformers work, done in a child process and remembered in the amxc cache.

Tracing a model and converting a GGUF vocabulary into a tokenizer need transformers, which
imports torch; both stay resident once imported.  On SmolLM2-135M (Zen 4) a process held 33 MB
after importing numpy and amxc, 224 MB after torch, and 591 MB after the trace with no weight
loaded.  A compile that goes on to calibrate (GPTQ) and an `amxc run` that goes on to serve
would carry that to the end.  So each job runs in a child process (`python -m
amxc.frontend.child_jobs REQUEST.json OUT_DIR`) that writes files this process reads back:

- "trace": the weightless module as IR text (parameters are declarations; the caller attaches
  its own weight loaders), the computed buffers (RoPE inverse frequencies) and the tied-weight
  aliases.  It depends only on the config and name, so its entry is shared by every checkpoint
  of an architecture: compiling it again parses 0.25 MB of IR text (0.7 s) instead of tracing
  (13-18 s).
- "gguf-tokenizer": HF tokenizer files built from a GGUF file's vocabulary, keyed by the file's
  identity (path, size, modification time).

Each entry's key also hashes the torch, transformers and tokenizers versions and amxc's frontend
and IR source, so an upgrade never reads a stale entry.  An entry is written into a temporary
directory and renamed into place: another process sees a whole entry or none.  Where
transformers is already imported (a notebook, a test process) a child would only pay torch's
import again, so the job runs in-process, through the same files.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import FrontendError, UnsupportedOpError


def _reported_errors() -> dict[str, type]:
    """The errors a child reports by name (its message is for the user) and this process raises
    again; anything else is a crash, reported with the child's stderr."""
    from .gguf import GGUFError
    return {e.__name__: e for e in (FrontendError, UnsupportedOpError, GGUFError)}


def traced_module(kind: str, config: dict, name: str, where: str):
    """(module without loaders, computed buffers, tied aliases, base-model prefixes) of a
    transformers model.  `kind`: "hf" (`config` is config.json's object) or "gguf" (the
    AutoConfig.for_model keywords); `where` names the config in error messages."""
    from amxc.ir import parse_module

    entry = _entry({"job": "trace", "kind": kind, "config": config, "name": name, "where": where})
    module = parse_module((entry / "module.ir").read_text(encoding="utf-8"), filename=str(entry / "module.ir"))
    with np.load(entry / "buffers.npz", allow_pickle=False) as z:
        buffers = {k: z[k] for k in z.files}
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    return module, buffers, meta["aliases"], tuple(meta["prefixes"])


def gguf_tokenizer(path: Path, out_dir: Path) -> None:
    """Copy the HF tokenizer files of GGUF file `path` into `out_dir`."""
    path = path.resolve()
    st = path.stat()
    entry = _entry({"job": "gguf-tokenizer", "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted((entry / "tokenizer").iterdir()):
        shutil.copyfile(f, out_dir / f.name)


def _entry(request: dict) -> Path:
    from amxc.frontend.pull import cache_dir

    entry = cache_dir() / "frontend" / f"{request['job']}-{_key(request)}"
    if not entry.is_dir():
        _run_into(entry, request)
    return entry


def _key(request: dict) -> str:
    """The entry's name: what the job reads, the library versions and amxc's code; not `where`,
    which only names the config in an error (and an entry is written only on success)."""
    versions = {p: _version(p) for p in ("torch", "transformers", "tokenizers")}
    what = {k: v for k, v in request.items() if k != "where"}
    text = json.dumps({"request": what, "versions": versions, "code": _code_digest()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """A hash of the code whose output an entry is: the frontend and the IR (its printer)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted([*root.glob("*.py"), *(root.parent / "ir").rglob("*.py")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _run_into(entry: Path, request: dict) -> None:
    entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = entry.parent.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:      # as the kernel cache (backends/toolchain.py)
        raise FrontendError(f"refusing amxc's cache {entry.parent}: owned by uid {st.st_uid} with mode "
                            f"{st.st_mode & 0o777:o}, so others could plant the graphs amxc compiles; "
                            f"`chmod go-w` it if it is yours, or set AMXC_CACHE to a private directory")
    tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=entry.parent))
    try:
        if "transformers" in sys.modules or os.environ.get("AMXC_FRONTEND_IN_PROCESS") == "1":
            run_job(request, tmp)
        else:
            _run_in_child(request, tmp)
        try:
            tmp.rename(entry)
        except OSError:               # another process wrote the same entry first
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_in_child(request: dict, out: Path) -> None:
    request_path = out.parent / f"{out.name}.request.json"
    request_path.write_text(json.dumps(request), encoding="utf-8")
    try:
        proc = subprocess.run([sys.executable, "-m", "amxc.frontend.child_jobs", str(request_path), str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")
    finally:
        request_path.unlink(missing_ok=True)
    error = out / "error.json"
    if error.is_file():
        err = json.loads(error.read_text(encoding="utf-8"))
        raise _reported_errors().get(err["type"], FrontendError)(err["message"])
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        what = request.get("where") or request.get("path")
        raise FrontendError(f"{what}: the frontend's {request['job']} failed in its child process "
                            f"(exit status {proc.returncode}):\n{tail}")


def run_job(request: dict, out: Path) -> None:
    """Do `request` in this process, writing its files into `out`."""
    if request["job"] == "gguf-tokenizer":
        from .gguf import GGUFCheckpoint
        GGUFCheckpoint(request["path"]).save_tokenizer(out / "tokenizer")
        return
    from amxc.ir import print_module

    from .hf import trace_config
    module, buffers, aliases, prefixes = trace_config(request["kind"], request["config"], request["name"],
                                                      request["where"])
    (out / "module.ir").write_text(print_module(module), encoding="utf-8")
    np.savez(out / "buffers.npz", **buffers)
    (out / "meta.json").write_text(json.dumps({"aliases": aliases, "prefixes": list(prefixes)}), encoding="utf-8")


def _child(request_path: str, out: str) -> int:
    out_dir = Path(out)
    try:
        run_job(json.loads(Path(request_path).read_text(encoding="utf-8")), out_dir)
    except tuple(_reported_errors().values()) as e:
        (out_dir / "error.json").write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:3]))

"""The public Python API (the CLI is a thin layer over it)."""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

from amxc.ir import Module


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def trace(model, *, progress: bool = False) -> Module:
    """Import a model (checkpoint directory, .gguf, .pt2, or a known name such as
    'smollm2-135m') into an IR module.  Weights stay on disk until needed."""
    from amxc.frontend import load_model, resolve
    t0 = time.perf_counter()
    kind, path = resolve(model)
    _say(f"tracing {path} ({kind}) with torch.export …", progress)
    module = load_model(path)
    _say(f"traced {len(module.main.nodes)} ops, {len(module.params)} parameters "
         f"({module.param_bytes() / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s", progress)
    return module


def compile(model, output: str | os.PathLike, *, progress: bool = True) -> Path:
    """Trace `model` and write a compiled artifact directory at `output`."""
    from amxc.frontend import write_tokenizer
    from amxc.ir import verify
    from amxc.runtime.artifact import save_artifact

    module = trace(model, progress=progress)
    verify(module)
    t0 = time.perf_counter()
    out = save_artifact(module, output, config=dict(module.attrs), progress=progress,
                        write_tokenizer=lambda d: write_tokenizer(model, d))
    _say(f"wrote {out} in {time.perf_counter() - t0:.1f} s", progress)
    return out


def load_ir(target, *, progress: bool = False) -> tuple[Module, dict | None]:
    """An IR module from an artifact directory, an .ir text file, or a model to trace."""
    from amxc.ir import parse_module
    from amxc.runtime.artifact import load_artifact

    path = Path(target)
    if path.is_dir() and (path / "manifest.json").exists():
        return load_artifact(path)
    if path.is_file() and path.suffix == ".ir":
        return parse_module(path.read_text(), filename=str(path)), None
    return trace(target, progress=progress), None


def stats(module: Module) -> dict:
    """Op counts and parameter counts/bytes, total and per dtype."""
    ops = Counter(n.op for fn in module.functions.values() for n in fn.nodes)
    by_dtype: dict[str, dict[str, int]] = {}
    for p in module.params.values():
        d = by_dtype.setdefault(str(p.type.dtype), {"params": 0, "elements": 0, "bytes": 0})
        d["params"] += 1
        d["elements"] += p.type.numel()
        d["bytes"] += p.type.nbytes()
    return {"ops": dict(ops.most_common()), "nodes": sum(ops.values()), "params": by_dtype,
            "param_elements": sum(d["elements"] for d in by_dtype.values()),
            "param_bytes": sum(d["bytes"] for d in by_dtype.values())}


def format_stats(module: Module) -> str:
    s = stats(module)
    lines = [f"module @{module.name}: {s['nodes']} ops, {s['param_elements']:,} parameter elements, "
             f"{s['param_bytes']:,} bytes", "", "ops:"]
    lines += [f"  {op:<14} {n:>6}" for op, n in s["ops"].items()]
    lines += ["", "parameters:", f"  {'dtype':<10} {'tensors':>8} {'elements':>15} {'bytes':>15} {'B/elem':>7}"]
    for dt, d in s["params"].items():
        lines.append(f"  {dt:<10} {d['params']:>8} {d['elements']:>15,} {d['bytes']:>15,} "
                     f"{d['bytes'] / max(d['elements'], 1):>7.3f}")
    return "\n".join(lines)

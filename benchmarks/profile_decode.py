"""Where the time of a decode step goes: every IR node of @decode timed natively (AMXC_PROFILE
build), grouped by what it is, next to the time the bytes it must read take at the read
bandwidth measured in the same run (benchmarks/bandwidth.py): weights for linear layers, the
cached keys and values for attention.  A group far above its bound is the place to work.
Prints a table and writes an SVG bar chart (measured bars, bound marks).

    python benchmarks/profile_decode.py ART [--tokens 64] [--batch 1] [--threads 2] [--svg decode_profile.svg]

--batch N decodes N sequences per step (the serving case): weights are read once per step, the
cached keys and values once per sequence.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np


def group_of(node) -> str:
    if node.op in ("linear", "linear_nf4"):
        role = node.inputs[1].name.split(".")[-2]              # q_proj, o_proj, lm_head, ...
        return f"{node.op} {role}"
    return node.op


def bytes_read(node, context: int, batch: int = 1) -> int:
    """Bytes a decode step must read for `node` (`batch` sequences at `context` cached tokens):
    its parameters once, and for attention the keys and values of its layer per sequence."""
    from amxc.ir import Param
    params = sum(x.type.nbytes() for x in node.inputs if isinstance(x, Param) and node.op != "embedding")
    if node.op == "embedding":                  # one row of the table
        table = node.inputs[0]
        params = table.type.nbytes() // int(table.type.shape[0])
    if node.op == "attention_cached":
        cache = node.inputs[4].type             # rows of KVCacheType.row float32 words (f32, f16, i8)
        params += 2 * cache.kv_heads * cache.row * 4 * context * batch
    return params


def profile(art: str, tokens: int, batch: int = 1):
    from amxc.backends.program import NativeOptions, NativeProgram
    from amxc.runtime.artifact import load_artifact
    from amxc.runtime.engine import Engine

    module, manifest = load_artifact(art)
    ex = NativeProgram(module, NativeOptions.from_env(profile=True))
    engine = Engine(module, manifest, None, program=ex)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, int(module.attrs["vocab_size"]), 128).tolist() for _ in range(batch)]
    engine.generate(prompts[0][:16], max_new_tokens=4, ignore_eos=True)        # warm-up, then count from here
    before = [t for _, t in ex.profile("decode")]
    engine.generate(prompts if batch > 1 else prompts[0], max_new_tokens=tokens, ignore_eos=True)
    steps = len(engine.last_timings.decode)
    per_group: dict[str, float] = collections.Counter()
    bytes_group: dict[str, int] = collections.Counter()
    context = len(prompts[0]) + tokens // 2             # the mean cached length over the run
    for (node, t), t0 in zip(ex.profile("decode"), before):
        per_group[group_of(node)] += (t - t0) / steps
        bytes_group[group_of(node)] += bytes_read(node, context, batch)
    wall = sum(engine.last_timings.decode) / steps
    return dict(per_group.most_common()), bytes_group, wall, engine.last_timings, ex.tier


def svg_bars(rows: dict[str, float], title: str, bounds: dict[str, float] | None = None,
             width: int = 760) -> str:
    """Horizontal bars of seconds per row; a bound (seconds) is drawn as a dark tick."""
    bar_h, gap, left, top = 18, 6, 230, 40
    bounds = bounds or {}
    top_ms = max([*rows.values(), *bounds.values()]) * 1e3
    height = top + len(rows) * (bar_h + gap) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="22" font-size="15" font-weight="bold">{escape(title)}</text>']
    for i, (name, sec) in enumerate(rows.items()):
        y = top + i * (bar_h + gap)
        w = (width - left - 90) * sec * 1e3 / top_ms
        out.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end">{escape(name)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#4a7fb5"/>')
        label = f"{sec * 1e3:.2f} ms"
        if bounds.get(name):
            b = (width - left - 90) * bounds[name] * 1e3 / top_ms
            out.append(f'<rect x="{left + b - 1:.1f}" y="{y - 2}" width="3" height="{bar_h + 4}" fill="#222"/>')
            label += f" (bound {bounds[name] * 1e3:.2f})"
        out.append(f'<text x="{left + w + 6:.1f}" y="{y + 13}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded per step")
    ap.add_argument("--threads", type=int, default=None, help="threads (default: AMXC_NUM_THREADS or all)")
    ap.add_argument("--svg", type=Path, default=Path("decode_profile.svg"))
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = ap.parse_args()
    import os
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bandwidth
    from amxc.backends import env
    if args.threads:
        os.environ["AMXC_NUM_THREADS"] = str(args.threads)
    bw = bandwidth.measure(env.threads())
    rows, nbytes, wall, timings, tier = profile(args.artifact, args.tokens, args.batch)
    bounds = {name: nbytes[name] / (bw["read_GBps"] * 1e9) for name in rows}
    total = sum(rows.values())
    print(f"decode step of {args.batch} sequence(s): {wall * 1e3:.2f} ms wall ({args.batch / wall:.1f} tok/s), {total * 1e3:.2f} ms in kernels, "
          f"tier {tier}; sampling {1e3 * timings.sampling / max(len(timings.decode), 1):.2f} ms/token")
    print(f"read bandwidth {bw['read_GBps']:.1f} GB/s (native loop; numpy {bw['numpy_read_GBps']:.1f}); "
          f"all bytes of a step at that speed: {1e3 * sum(bounds.values()):.2f} ms")
    print(f"{'':<30} {'ms/step':>9} {'share':>7} {'MB read':>9} {'bound ms':>9} {'x bound':>8}")
    for name, sec in rows.items():
        ratio = f"{sec / bounds[name]:8.2f}" if bounds[name] else f"{'-':>8}"
        print(f"{name:<30} {sec * 1e3:9.3f} {100 * sec / total:6.1f}% {nbytes[name] / 1e6:9.3f} "
              f"{bounds[name] * 1e3:9.3f} {ratio}")
    title = f"{Path(args.artifact).name}: one decode step of {args.batch}, {wall * 1e3:.1f} ms ({tier}); ticks: bandwidth bound"
    args.svg.write_text(svg_bars(rows, title, bounds))
    if args.json:
        import json
        args.json.write_text(json.dumps({"seconds": rows, "bound_seconds": bounds, "bytes": dict(nbytes),
                                         "wall_s": wall, "read_GBps": bw["read_GBps"], "tier": tier}, indent=1))
    print(f"wrote {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

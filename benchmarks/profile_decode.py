"""Where the time of a decode step goes: every IR node of @decode timed natively (AMXC_PROFILE
build), grouped by what it is, against the time the step's weight bytes need at the measured
read bandwidth.  Prints a table and writes an SVG bar chart.

    python benchmarks/profile_decode.py ART [--tokens 64] [--svg decode_profile.svg]
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


def profile(art: str, tokens: int):
    from amxc.backends.executor import NativeExecutor
    from amxc.runtime.artifact import load_artifact
    from amxc.runtime.engine import Engine

    module, manifest = load_artifact(art)
    ex = NativeExecutor(module, profile=True)
    engine = Engine(module, manifest, None, executor=ex)
    prompt = np.random.default_rng(0).integers(3, int(module.attrs["vocab_size"]), 128).tolist()
    engine.generate(prompt[:16], max_new_tokens=4, ignore_eos=True)            # warm-up, then count from here
    before = [t for _, t in ex.profile("decode")]
    engine.generate(prompt, max_new_tokens=tokens, ignore_eos=True)
    steps = len(engine.last_timings.decode)
    per_group: dict[str, float] = collections.Counter()
    for (node, t), t0 in zip(ex.profile("decode"), before):
        per_group[group_of(node)] += (t - t0) / steps
    wall = sum(engine.last_timings.decode) / steps
    return dict(per_group.most_common()), wall, engine.last_timings, ex.tier


def svg_bars(rows: dict[str, float], title: str, width: int = 760) -> str:
    bar_h, gap, left, top = 18, 6, 230, 40
    top_ms = max(rows.values()) * 1e3
    height = top + len(rows) * (bar_h + gap) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<text x="10" y="22" font-size="15" font-weight="bold">{escape(title)}</text>']
    for i, (name, sec) in enumerate(rows.items()):
        y = top + i * (bar_h + gap)
        w = (width - left - 90) * sec * 1e3 / top_ms
        out.append(f'<text x="{left - 8}" y="{y + 13}" text-anchor="end">{escape(name)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#4a7fb5"/>')
        out.append(f'<text x="{left + w + 6:.1f}" y="{y + 13}">{sec * 1e3:.2f} ms</text>')
    out.append("</svg>")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--svg", type=Path, default=Path("decode_profile.svg"))
    args = ap.parse_args()
    rows, wall, timings, tier = profile(args.artifact, args.tokens)
    total = sum(rows.values())
    print(f"decode step: {wall * 1e3:.2f} ms wall ({1 / wall:.1f} tok/s), {total * 1e3:.2f} ms in kernels, "
          f"tier {tier}; sampling {1e3 * timings.sampling / max(len(timings.decode), 1):.2f} ms/token")
    print(f"{'':<30} {'ms/step':>9} {'share':>7}")
    for name, sec in rows.items():
        print(f"{name:<30} {sec * 1e3:9.3f} {100 * sec / total:6.1f}%")
    title = f"{Path(args.artifact).name}: one decode step, {wall * 1e3:.1f} ms ({tier})"
    args.svg.write_text(svg_bars(rows, title))
    print(f"wrote {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

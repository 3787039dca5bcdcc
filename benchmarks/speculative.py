"""Speculative decoding by prompt lookup (`--speculate ngram:K`) and by a draft model
(`--speculate draft:K:ART`): acceptance and decode speed-up on input-grounded prompts (rewrite,
extract, continue, edit a given text) and on free-form ones, against plain decoding of the same
artifact in the same process.  A measurement, not a test.

    python benchmarks/speculative.py [--mode ngram|draft|both] [--art ART] [--draft ART]
                                     [--k K] [--new-tokens 128] [--reps 3]

Default models: SmolLM2-135M-Instruct (../shared/models); ngram: compiled NF4 round-to-nearest;
draft: the f32 artifact as target and the NF4 one as its draft (the same weights in 4 bits: it
reads 1/7 of the target's bytes a token).  Prompts go through the chat template, greedy,
stopping at the end of turn.  Each prompt runs plain and
speculative decoding alternately `--reps` times; the figure is the median decode time of each
(the tokens are checked identical, so both decode the same tokens).  Speed-up = plain / speculative
decode time; acceptance = accepted / drafted tokens.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct-q4_1"

STORY = (SHARED / "eval" / "tinystories_dev.txt").read_text()[:700]
NOVEL = (SHARED / "eval" / "botchan.txt").read_text()[2000:2700]
CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    out = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            out.append(total / window)
    return out
'''

GROUNDED = {
    "rewrite": f"Rewrite this story in the past tense, keeping every sentence:\n\n{STORY}",
    "copy-edit": f"Fix the punctuation of this text and return the whole text:\n\n{NOVEL}",
    "extract": f"List every sentence of this story that mentions a person's name:\n\n{STORY}",
    "continue": f"Repeat this passage word for word, then continue it:\n\n{NOVEL}",
    "code-edit": f"Rename the variable total to running_sum in this Python function. Reply with the whole "
                 f"function in a code block.\n\n```python\n{CODE}```",
}
FREE = {
    "poem": "Write a short poem about the sea.",
    "advice": "Give me three tips for sleeping better.",
    "story": "Tell me a story about a dragon who is afraid of the dark.",
}


def compiled(name: str, quant: str | None) -> Path:
    """SmolLM2 compiled with `quant` into the benchmarks' work folder, once."""
    import amxc
    art = Path(tempfile.gettempdir()) / "amxc-bench" / name
    if not (art / "manifest.json").exists():
        amxc.compile(SMOLLM2, art, quant=quant, progress=False)
    return art


def run(engine, prompt: str, new_tokens: int):
    g = engine.generate(engine.chat_prompt([{"role": "user", "content": prompt}]), max_new_tokens=new_tokens,
                        add_special_tokens=False)
    t = engine.last_timings
    return g, sum(t.decode), len(t.decode)


def measure(plain, spec, title: str, args) -> None:
    from amxc.backends import isa
    for e in (plain, spec):
        e.warm_up()
    print(f"\n# {title}, tier {isa.best_tier()}, up to {args.new_tokens} new tokens, median of {args.reps}")
    print("| prompt | kind | tokens | steps plain → spec | acceptance | plain tok/s | spec tok/s | speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = {"grounded": [], "free": []}
    for kind, prompts in (("grounded", GROUNDED), ("free", FREE)):
        for name, prompt in prompts.items():
            tp, ts = [], []
            for _ in range(args.reps):
                gp, sp, np_ = run(plain, prompt, args.new_tokens)
                gs, ss, ns = run(spec, prompt, args.new_tokens)
                tp.append(sp)
                ts.append(ss)
            same = gp.ids == gs.ids
            tokens = len(gp.ids) - 1                      # the first comes from the prefill step
            mp, ms = statistics.median(tp), statistics.median(ts)
            acc = gs.acceptance
            ratios[kind].append(mp / ms)
            print(f"| {name} | {kind} | {tokens} | {np_} → {ns} | {'-' if acc is None else f'{acc:.0%}'} | "
                  f"{tokens / mp:.1f} | {tokens / ms:.1f} | {mp / ms:.2f}x | {same} |", flush=True)
    for kind, r in ratios.items():
        print(f"{kind}: median speed-up {statistics.median(r):.2f}x (min {min(r):.2f}x, max {max(r):.2f}x)")
    cost = spec.scheduler.step_cost.ratios()      # what verification cost: the drafter's view
    print("decode step time by rows, over one row's (medians of the last steps): " +
          ", ".join(f"{r}: {v:.2f}x" for r, v in cost.items()))
    for e in (plain, spec):
        e.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("ngram", "draft", "both"), default="both")
    ap.add_argument("--art", default=None, help="ngram: an artifact (default: SmolLM2 NF4, compiled once)")
    ap.add_argument("--target", default=None, help="draft: the target artifact (default: SmolLM2 f32)")
    ap.add_argument("--draft", default=None, help="draft: the draft artifact (default: SmolLM2 NF4)")
    ap.add_argument("--k", type=int, default=None, help="drafted tokens (default: the mode's, 6 ngram, 4 draft)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from amxc.runtime.engine import Engine

    nf4 = None if args.art and args.draft else compiled("smollm2-nf4-rtn.amxc", "nf4{method=rtn}")
    if args.mode in ("ngram", "both"):
        art = args.art or nf4
        spec = "ngram" if args.k is None else f"ngram:{args.k}"
        measure(Engine.load(art), Engine.load(art, speculate=spec), f"{Path(art).name}, {spec}", args)
    if args.mode in ("draft", "both"):
        target, draft = args.target or compiled("smollm2-f32.amxc", None), args.draft or nf4
        k = "" if args.k is None else f"{args.k}:"
        measure(Engine.load(target), Engine.load(target, speculate=f"draft:{k}{draft}"),
                f"{Path(target).name}, draft:{k}{Path(draft).name}", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

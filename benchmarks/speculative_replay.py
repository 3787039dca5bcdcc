"""Prompt-lookup drafting judged without timing noise: speculative.py's prompts are decoded once
plainly (greedy), the step time of 1 .. K + 1 rows is measured on this host (forced drafts,
cycled step by step, medians), and the real `Drafter` is then replayed against the recorded
tokens: each step drafts what it would have, takes the drafted tokens that match the recorded
ones (greedy verification takes exactly those), and costs its row count's measured time.
Speed-up = plain steps' cost / replayed steps' cost.  A VM's drift moves timed runs of
speculative.py by +-0.1x; this moves only with the cost table, so drafting rules and K can be
compared in one sitting.  A measurement, not a test.

    python benchmarks/speculative_replay.py [--art ART] [--k 3,4,5,6] [--new-tokens 128]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plain_outputs(engine, prompts: dict, new_tokens: int) -> dict[str, tuple[list[int], list[int]]]:
    out = {}
    for name, prompt in prompts.items():
        ids = engine.chat_prompt([{"role": "user", "content": prompt}])
        g = engine.generate(ids, max_new_tokens=new_tokens, add_special_tokens=False)
        out[name] = (list(g.prompt_ids), list(g.ids))
    return out


def step_costs(art, prompts: dict, rows: int, new_tokens: int) -> dict[int, float]:
    """Median decode step time of 1 .. rows rows over one row's: every step drafts a forced
    number of tokens (0 .. rows - 1, cycled), so all counts see the same contexts and drift."""
    from amxc.runtime import scheduler, speculate
    from amxc.runtime.engine import Engine

    engine = Engine.load(art, speculate=f"ngram:{rows - 1}")
    counts = itertools.cycle(range(rows))
    seen: dict[int, list[float]] = {}
    observe = engine.scheduler.step_cost.observe

    def spy(r, seconds):
        seen.setdefault(r, []).append(seconds)
        observe(r, seconds)

    class Forced(speculate.Drafter):
        def propose(self, tokens, room):
            return [int(tokens[-1])] * min(next(counts), room)

        def record(self, *args, **kwargs):
            pass

    engine.scheduler.step_cost.observe = spy
    saved, scheduler.Drafter = scheduler.Drafter, Forced     # the scheduler makes each request's
    try:                                                     # drafter by this name
        engine.warm_up()
        for prompt in prompts.values():
            engine.generate(engine.chat_prompt([{"role": "user", "content": prompt}]), max_new_tokens=new_tokens,
                            add_special_tokens=False, ignore_eos=True)
    finally:
        scheduler.Drafter = saved
        engine.close()
    one = statistics.median(seen[1])
    return {r: statistics.median(v) / one for r, v in sorted(seen.items())}


def replay(prompt: list[int], output: list[int], drafter, cost: dict[int, float], max_tokens: int) -> float:
    """Plain decoding's cost over the drafter's, both in one-row steps."""
    tokens, pos, spent = prompt + output[:1], 1, 0.0
    while pos < len(output):
        room = max_tokens - pos - 1
        draft = drafter.propose(tokens, room) if room > 0 else []
        taken = 0
        while taken < len(draft) and pos + taken < len(output) - 1 and draft[taken] == output[pos + taken]:
            taken += 1
        spent += cost[1 + len(draft)]
        if draft:
            drafter.record(len(draft), taken, cost[1 + len(draft)] * 1e-3)
        tokens += output[pos:pos + taken + 1]
        pos += taken + 1
    return (len(output) - 1) / spent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--art", default=None, help="an artifact (default: speculative.py's SmolLM2 NF4)")
    ap.add_argument("--k", default="3,4,5,6", help="draft lengths to replay")
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import speculative as bench
    from amxc.backends import isa
    from amxc.runtime.engine import Engine
    from amxc.runtime.speculate import Drafter, Speculation, StepCost

    art = args.art or bench.compiled("smollm2-nf4-rtn.amxc", "nf4{method=rtn}")
    ks = [int(k) for k in args.k.split(",")]
    prompts = {**bench.GROUNDED, **bench.FREE}
    plain = Engine.load(art)
    outputs = plain_outputs(plain, prompts, args.new_tokens)
    plain.close()
    cost = step_costs(art, prompts, max(ks) + 1, args.new_tokens)
    print(f"# {Path(art).name}, tier {isa.best_tier()}: step time by rows over one row's: "
          + ", ".join(f"{r}: {c:.2f}x" for r, c in cost.items()))
    print("| K | " + " | ".join(prompts) + " | grounded median | free-form min |")
    print("|---" * (len(prompts) + 3) + "|")
    measured = StepCost()                  # what the drafters weigh their drafts by: the table
    for rows, c in cost.items():           # above, a one-row step taken as 1 ms
        for _ in range(StepCost.MIN_SEEN):
            measured.observe(rows, c * 1e-3)
    for k in ks:
        speed = {name: replay(*outputs[name], Drafter(Speculation(tokens=k), measured), cost, args.new_tokens)
                 for name in prompts}
        grounded = statistics.median(speed[n] for n in bench.GROUNDED)
        free = min(speed[n] for n in bench.FREE)
        print(f"| {k} | " + " | ".join(f"{speed[n]:.2f}x" for n in prompts) + f" | {grounded:.2f}x | {free:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

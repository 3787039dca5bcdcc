"""KV exhaustion at full size (issue 14, show 3): N concurrent long generations with KV room for
only some of them must all finish, with the tokens each produces alone.  A measurement, not a
test (tests/runtime/test_scheduler_models.py runs the same check small).

    python benchmarks/scheduler_stress.py ART [--requests 32] [--tokens 1000] [--room 8]
                                              [--gemv int8|exact] [--prompt 32]

Reports the preemption count, the wall time, how many requests equal their solo runs, and for
any that differ (possible on the int8 path, where a recomputed token runs the prefill GEMM
instead of the decode GEMV) the logit gap of the two candidates at the first difference.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from amxc.backends.program import NativeOptions, NativeProgram
from amxc.runtime.artifact import load_artifact
from amxc.runtime.engine import Engine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--room", type=int, default=8, help="sequences the KV cache holds at full length")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gemv", default="int8", choices=("int8", "exact"))
    args = ap.parse_args()
    module, manifest = load_artifact(args.artifact)
    program = NativeProgram(module, NativeOptions.from_env(gemv=args.gemv))
    vocab = int(manifest["config"]["vocab_size"])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, args.prompt).tolist() for _ in range(args.requests)]
    per_seq = args.prompt + args.tokens
    tight = Engine(module, manifest, None, program=program, kv_tokens=args.room * per_seq,
                   max_seqs=args.requests)
    t0 = time.perf_counter()
    outs = tight.generate(prompts, max_new_tokens=args.tokens, ignore_eos=True)
    wall = time.perf_counter() - t0
    stats = tight.scheduler.stats
    print(f"{args.requests} x {args.tokens} tokens, KV room for {args.room} ({tight.blocks.num_blocks} blocks): "
          f"{stats.preemptions} preemptions, {wall:.1f} s, {stats.generated_tokens / wall:.1f} tok/s, "
          f"finish reasons {sorted({o.finish_reason for o in outs})}, blocks in use after: {tight.blocks.num_used}")
    solo_engine = Engine(module, manifest, None, program=program, kv_tokens=per_seq + 64, prefix_caching=False)
    equal, gaps = 0, []
    t0 = time.perf_counter()
    for i, (p, o) in enumerate(zip(prompts, outs)):
        solo = solo_engine.generate(p, max_new_tokens=args.tokens, ignore_eos=True).ids
        if solo == o.ids:
            equal += 1
            continue
        j = next(j for j in range(len(solo)) if solo[j] != o.ids[j])
        logits = solo_engine.logits(p + solo[:j])[-1]
        gaps.append((i, j, abs(float(logits[solo[j]] - logits[o.ids[j]]))))
    print(f"solo runs: {time.perf_counter() - t0:.1f} s; {equal} of {args.requests} equal")
    for i, j, gap in gaps:
        print(f"  request {i}: first differs at token {j}, logit gap {gap:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

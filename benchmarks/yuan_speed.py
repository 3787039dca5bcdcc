"""Yuan 2.0 at the 2B configuration against a Llama of the same parameter count (issue 18, show 5).
A measurement, not a test.

    python benchmarks/yuan_speed.py [--work /tmp/amxc-yuan] [--reps 3] [--threads 2]

Models (random weights, bf16 safetensors, built once): Yuan2-2B's config (hidden 2048, 24
layers, 32 heads, intermediate 8192, vocab 135040, tied head; research/yuan_tp.md §1.1) and a
Llama with the same hidden size, layers, heads (MHA), vocabulary and tied head whose MLP is
widened so the two have the same number of parameters (Yuan's LF convolutions are 2h² a layer).
Both compiled with --quant nf4 (LF convolutions in NF4 too, like every linear).  Speed protocol:
benchmarks/decode_speed.py (128-token prompt, 63 decode steps, median of --reps processes,
round-robin).  Then benchmarks/profile_decode.py on the Yuan artifact: the share of the decode
step spent in Localized Filtering (its two convolutions and the state/pair ops).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
YUAN2_2B = dict(model_type="yuan", architectures=["YuanForCausalLM"], hidden_size=2048, num_hidden_layers=24,
                num_attention_heads=32, intermediate_size=8192, vocab_size=135040, max_position_embeddings=8192,
                rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=77185, eos_token_id=77185,
                hidden_act="silu")


def yuan_shapes(c: dict) -> dict:
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    **{p + f"self_attn.{n}_proj.weight": (h, h) for n in "qkvo"},
                    p + "self_attn.lf_gate.conv1.weight": (h // 2, h, 2, 1), p + "self_attn.lf_gate.conv1.bias": (h // 2,),
                    p + "self_attn.lf_gate.conv2.weight": (h, h // 2, 2, 1), p + "self_attn.lf_gate.conv2.bias": (h,),
                    p + "self_attn.lf_gate.output_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})
    return out


def llama_like(c: dict) -> tuple[dict, dict]:
    """A Llama config with Yuan's shapes whose MLP absorbs the LF parameters (2h² + 1.5h + h a
    layer), rounded to a multiple of 64, and its tensor shapes."""
    h, L = c["hidden_size"], c["num_hidden_layers"]
    f = c["intermediate_size"] + round((2 * h * h + 2.5 * h) / (3 * h) / 64) * 64
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=h, num_hidden_layers=L,
               num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_attention_heads"],
               intermediate_size=f, vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"],
               rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0, hidden_act="silu")
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       **{p + f"self_attn.{n}_proj.weight": (h, h) for n in "qkvo"},
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f)})
    return cfg, shapes


def KIND_OF(group: str) -> str | None:
    """profile_decode's group -> amxc plan's kind of weight read."""
    role = group.split()[-1]
    if group.startswith("lf_") or role in ("conv1", "conv2"):
        return "lf"
    return {"q_proj": "attn.qk", "k_proj": "attn.qk", "v_proj": "attn.v", "o_proj": "attn.o",
            "mlp_swiglu": "mlp", "attention_cached": "kv", "linear_q8": "lm_head"}.get(role)


def run_child(art: str, threads: int) -> dict:
    code = (f"import sys,json; sys.path.insert(0, {str(HERE)!r}); from decode_speed import child_amxc; "
            f"print(json.dumps(child_amxc({art!r}, {threads})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/amxc-yuan"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps profiled")
    args = ap.parse_args()
    import amxc
    sys.path.insert(0, str(HERE))
    from trace_memory import write_shards
    args.work.mkdir(parents=True, exist_ok=True)
    models = {"yuan2-2b": (YUAN2_2B, yuan_shapes(YUAN2_2B)), "llama-same-params": llama_like(YUAN2_2B)}
    arts, params = {}, {}
    for name, (cfg, shapes) in models.items():
        ckpt = args.work / name
        if not (ckpt / "config.json").exists():
            print(f"writing {name} …", file=sys.stderr, flush=True)
            write_shards(ckpt, cfg, shapes)
        params[name] = sum(int(__import__("math").prod(s)) for s in shapes.values())
        art = args.work / f"{name}-nf4.amxc"
        if not (art / "manifest.json").exists():
            print(f"compiling {art.name} …", file=sys.stderr, flush=True)
            amxc.compile(ckpt, art, quant="nf4", progress=False)
        arts[name] = str(art)
    runs = {name: [] for name in arts}
    for _ in range(args.reps):
        for name, art in arts.items():
            runs[name].append(run_child(art, args.threads))
    print(f"models: {', '.join(f'{n} {params[n] / 1e9:.3f}B params' for n in params)}; NF4; {args.threads} threads")
    result = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            print(f"{name}: {rs[0]['error']}")
            continue
        result[name] = {k: statistics.median(r[k] for r in ok) for k in ("prefill", "decode")}
        print(f"{name:<20} prefill {result[name]['prefill']:8.1f} tok/s   decode {result[name]['decode']:6.2f} tok/s")
    if len(result) == 2:
        y, l = result["yuan2-2b"], result["llama-same-params"]
        print(f"yuan / llama: prefill {y['prefill'] / l['prefill']:.2f}x, decode {y['decode'] / l['decode']:.2f}x")
    prof = args.work / "yuan2-2b-decode-profile.json"
    proc = subprocess.run([sys.executable, str(HERE / "profile_decode.py"), arts["yuan2-2b"], "--tokens",
                           str(args.tokens), "--threads", str(args.threads), "--svg",
                           str(args.work / "yuan2-2b-decode-profile.svg"), "--json", str(prof)],
                          capture_output=True, text=True)
    print(proc.stdout[-4000:] or proc.stderr[-2000:])
    data = json.loads(prof.read_text())
    secs, bounds = data["seconds"], data["bound_seconds"]
    total = sum(secs.values())
    lf = sum(v for k, v in secs.items() if KIND_OF(k) == "lf")
    print(f"Localized Filtering share of the decode step: {100 * lf / total:.1f} % "
          f"(conv1 + conv2 + state/pair ops, of {1e3 * total:.1f} ms in kernels)")
    kinds: dict[str, list[float]] = {}
    for k, v in secs.items():
        kind = KIND_OF(k)
        if kind and bounds.get(k):
            kinds.setdefault(kind, [0.0, 0.0])
            kinds[kind][0] += bounds[k]
            kinds[kind][1] += v
    eff = {k: round(b / t, 3) for k, (b, t) in kinds.items() if t}
    (args.work / "efficiency.json").write_text(json.dumps({"source": str(prof), "kinds": eff}, indent=1))
    print(f"achieved fraction of the bandwidth bound per kind: {eff} -> {args.work / 'efficiency.json'} "
          f"(amxc plan --efficiency)")
    lf = 100 * lf / total
    (args.work / "result.json").write_text(json.dumps({"speed": result, "params": params, "lf_share": lf}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

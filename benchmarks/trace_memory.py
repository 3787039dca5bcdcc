"""Peak resident memory of tracing and compiling a 1.1B-parameter Llama (TinyLlama-1.1B's
config, seeded random weights), as a ratio of the model's fp32 weight bytes.

    python benchmarks/trace_memory.py [--workdir DIR] [--keep]

Writes a sharded bf16 safetensors checkpoint (like the real TinyLlama), then runs, each in a fresh
process so peaks do not mix: (1) trace only (`amxc inspect --stats`), (2) full compile
(`amxc compile`, streaming every weight into weights.bin).  Prints peak RSS per step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                 architectures=["LlamaForCausalLM"], model_type="llama", bos_token_id=1, eos_token_id=2)


def tinyllama_shapes() -> dict[str, tuple[int, ...]]:
    c = TINYLLAMA
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    return shapes


def write_checkpoint(out: Path, shard_bytes: int = 1 << 30, seed: int = 0) -> int:
    """Sharded bf16 safetensors with an index, one shard in memory at a time; returns #params."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(TINYLLAMA, indent=1))
    gen = torch.Generator().manual_seed(seed)
    shard, size, n_shards, weight_map, total = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, size, n_shards
        if shard:
            n_shards += 1
            name = f"model-{n_shards:05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in tinyllama_shapes().items():
        t = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02)
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].nbytes
        total += t.numel()
        if size >= shard_bytes:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def peak_rss_of(cmd: list[str]) -> tuple[int, float]:
    """Run cmd in a child and return (peak RSS bytes of that child, seconds)."""
    code = ("import resource,subprocess,sys,time;t=time.time();"
            "r=subprocess.run(sys.argv[1:]);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024, time.time()-t,"
            " file=sys.stderr);sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak, secs = proc.stderr.strip().splitlines()[-1].split()
    return int(peak), float(secs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="amxc-mem-"))
    try:
        t0 = time.time()
        n = write_checkpoint(work / "tinyllama-random")
        fp32 = n * 4
        print(f"random TinyLlama-1.1B config: {n:,} parameters, fp32 weights {fp32 / 1e9:.2f} GB "
              f"(checkpoint written in {time.time() - t0:.0f} s)")
        amxc = [sys.executable, "-m", "amxc"]
        results = {}
        for step, cmd in (("trace", [*amxc, "inspect", str(work / "tinyllama-random"), "--stats",
                                      "-o", str(work / "stats.txt")]),
                          ("compile", [*amxc, "compile", str(work / "tinyllama-random"), "-o",
                                       str(work / "tinyllama.amxc"), "-q"])):
            peak, secs = peak_rss_of(cmd)
            results[step] = peak
            print(f"{step:8s} peak RSS {peak / 1e9:6.2f} GB = {peak / fp32:.2f}x fp32 weights  ({secs:.0f} s)")
        art = work / "tinyllama.amxc" / "weights.bin"
        print(f"weights.bin {art.stat().st_size / 1e9:.2f} GB")
        return 0 if max(results.values()) < 2 * fp32 else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

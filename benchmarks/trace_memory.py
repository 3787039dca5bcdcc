"""Peak resident memory of tracing and compiling a 1.1B-parameter Llama (TinyLlama-1.1B's
config, seeded random weights), against what streaming the weights allows.

    python benchmarks/trace_memory.py [--workdir DIR] [--keep]

Writes a sharded bf16 safetensors checkpoint (like the real TinyLlama) and the same model cut to
2 of its 22 layers (the same tensor shapes), then runs, each in a fresh process so
peaks do not mix: (0) trace the 2-layer model (the baseline: the process, imports and a traced
graph), (1) trace only (`amxc inspect --stats`), (2) full compile (`amxc compile`, streaming
every weight into weights.bin).  Prints peak RSS per step and the streaming bounds (bounds()).
"""
from __future__ import annotations

import argparse
import json
import os
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


def tinyllama_shapes(layers: int | None = None) -> dict[str, tuple[int, ...]]:
    c = {**TINYLLAMA, **({"num_hidden_layers": layers} if layers else {})}
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


def largest_fp32_bytes(layers: int | None = None) -> int:
    """fp32 bytes of the model's largest tensor (TinyLlama: embed_tokens and lm_head, 262 MB)."""
    return 4 * max(_numel(s) for s in tinyllama_shapes(layers).values())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bounds(baseline: int) -> dict[str, int]:
    """Peak RSS that streaming allows, over `baseline` (the peak of tracing the 2-layer model:
    the process, its imports and a traced graph, no weight loaded).  Tracing loads no weight:
    the 22-layer trace may exceed the baseline by one fp32 tensor at most (its larger graph
    measures +0.03 GB).  A compile then writes weights.bin one tensor at a time: the tensor
    just written is still referenced while the next one loads (1x), which is read in bf16
    (0.5x) and converted to fp32 (1x), so 2.5x the largest fp32 tensor over the trace, plus
    0.5x for the pass pipeline and allocator slack (measured 0.12 GB): 4x over the baseline in
    all.  Every weight at once is the whole fp32 model (4.4 GB), over 4x more than that."""
    largest = largest_fp32_bytes()
    return {"trace": baseline + largest, "compile": baseline + 4 * largest}


def write_checkpoint(out: Path, shard_bytes: int = 1 << 30, seed: int = 0, layers: int | None = None) -> int:
    """TinyLlama's checkpoint (random weights); `layers` cuts it to that many decoder layers
    (same shapes otherwise).  Returns #params."""
    config = {**TINYLLAMA, **({"num_hidden_layers": layers} if layers else {})}
    return write_shards(out, config, tinyllama_shapes(layers), shard_bytes, seed)


def write_shards(out: Path, config: dict, shapes: dict[str, tuple[int, ...]], shard_bytes: int = 1 << 30,
                 seed: int = 0) -> int:
    """Sharded bf16 safetensors with an index and config.json, one shard in memory at a time:
    norm weights 1, everything else N(0, 0.02) from one seeded stream.  Returns #params."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
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

    for name, shape in shapes.items():
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].nbytes
        total += t.numel()
        if size >= shard_bytes:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


PAGE = os.sysconf("SC_PAGE_SIZE")


def peak_rss_of(cmd: list[str], env: dict | None = None) -> tuple[int, float]:
    """Run cmd and return (peak RSS bytes, seconds): the peak of the process tree's summed RSS
    (cmd and the children it starts, such as the frontend's trace child), sampled every 20 ms,
    and never below the largest single process's own peak (rusage), which sampling could miss.
    Measured from a fresh small interpreter: a child forked from a large process (pytest's)
    inherits that process's high-water mark in its rusage.  `env`: cmd's environment."""
    proc = subprocess.run([sys.executable, __file__, "--peak-rss-of", *cmd], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak, secs = proc.stderr.strip().splitlines()[-1].split()
    return int(peak), float(secs)


def empty_cache_env(cache: Path) -> dict:
    """The environment with an empty amxc cache at `cache`, so the step traces the model (in the
    frontend's child process, whose memory counts) instead of reading a traced entry."""
    shutil.rmtree(cache, ignore_errors=True)
    return {**os.environ, "AMXC_CACHE": str(cache)}


def _measure(cmd: list[str], interval: float = 0.02, rescan: float = 0.5) -> int:
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, tree, scanned = 0, {proc.pid}, float("-inf")
    while True:                 # wait4: this child's rusage (with the children it waited for)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - scanned > rescan:      # the process list, twice a second: a scan of
            tree, scanned = _descendants(proc.pid), time.monotonic()   # /proc took 2.4 ms, and at
        peak = max(peak, _rss(tree))                 # every sample it slowed the 2-core compile it
        time.sleep(interval)                         # measured by ~13 % (calibration: 134 s vs 117)
    err = proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code:
        print(err[-3000:], file=sys.stderr)
        return code
    print(max(peak, usage.ru_maxrss * 1024), time.time() - t0, file=sys.stderr)
    return 0


def _descendants(root: int) -> set[int]:
    """`root` and its descendants, from one scan of /proc."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def _rss(pids: set[int]) -> int:
    """Summed resident bytes of `pids` (0 for any that exited)."""
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def main() -> int:
    if sys.argv[1:2] == ["--peak-rss-of"]:
        return _measure(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="amxc-mem-"))
    try:
        t0 = time.time()
        n = write_checkpoint(work / "tinyllama-random")
        write_checkpoint(work / "tinyllama-2-layers", layers=2)
        fp32 = n * 4
        print(f"random TinyLlama-1.1B config: {n:,} parameters, fp32 weights {fp32 / 1e9:.2f} GB, largest "
              f"tensor {largest_fp32_bytes() / 1e9:.3f} GB fp32 (checkpoints written in {time.time() - t0:.0f} s)")
        amxc = [sys.executable, "-m", "amxc"]
        results = {}
        for step, cmd in (("baseline", [*amxc, "inspect", str(work / "tinyllama-2-layers"), "--stats",
                                         "-o", str(work / "stats-2.txt")]),
                          ("trace", [*amxc, "inspect", str(work / "tinyllama-random"), "--stats",
                                      "-o", str(work / "stats.txt")]),
                          ("compile", [*amxc, "compile", str(work / "tinyllama-random"), "-o",
                                       str(work / "tinyllama.amxc"), "-q", "--no-prebuild"])):
            peak, secs = peak_rss_of(cmd, env=empty_cache_env(work / f"cache-{step}"))
            results[step] = peak
            print(f"{step:8s} peak RSS {peak / 1e9:6.2f} GB = {peak / fp32:.2f}x fp32 weights  ({secs:.0f} s)")
        art = work / "tinyllama.amxc" / "weights.bin"
        print(f"weights.bin {art.stat().st_size / 1e9:.2f} GB")
        limit = bounds(results["baseline"])
        for step, bound in limit.items():
            print(f"{step:8s} bound {bound / 1e9:6.2f} GB: {'ok' if results[step] <= bound else 'EXCEEDED'}")
        return 0 if all(results[s] <= b for s, b in limit.items()) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

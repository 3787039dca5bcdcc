"""W8A8 speed (issue #19, show 3): prefill and decode tok/s of W8A8 next to NF4 and fp32 on this
host, and on an AMX host the int8 tile GEMM's achieved fraction of its peak.

    python benchmarks/w8a8_speed.py [--arts DIR] [--prompt 128] [--new 64] [--reps 3]

Artifacts: DIR/SmolLM2-135M-{fp32,nf4-default,w8a8}.amxc (benchmarks/quant_table.py writes
them).  Each is benchmarked in its own child process (`amxc bench --json`, median of --reps).
The GEMM: q8 weights on int8 tiles (backends/templates/gemm_nf4_tiles_amx.cpp.j2, codes=q8) at
SmolLM2's MLP shapes and m=512 rows, timed over repeated calls; peak = cores x 1024 int8 MACs a
cycle (TDPBSSD: 16x16x64 MACs per instruction, 16 cycles throughput) x the clock in GHz
(--ghz, default: /proc/cpuinfo's cpu MHz).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = ("fp32", "nf4-default", "w8a8")


def bench(art: Path, prompt: int, new: int, reps: int) -> dict:
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-m", "amxc", "bench", str(art), "--prompt-tokens", str(prompt),
                              "--new-tokens", str(new), "--json"], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
    return {k: statistics.median(r[k] for r in runs) for k in ("prefill_tok_s", "decode_tok_s")}


def tile_gemm(n: int, k: int, m: int, threads: int) -> float:
    """Seconds per call of the q8 tile GEMM out[m, n] = x[m, k] W^T."""
    from amxc.backends import isa, toolchain
    from amxc.backends.kernels import TIER_HEADERS, KernelSet
    from amxc.ir.formats import q8
    if "amx" not in isa.TIERS or isa.best_tier() != "amx":
        raise SystemExit("no AMX on this host: the tile GEMM runs only under the emulator")
    ks = KernelSet("amx")
    name = ks.get("gemm_nf4_tiles", N=n, K=k, scale="f32", scale_block=1, mode="int8",
                  q8=ks.get("q8", K=k), codes="q8")
    sig = ("const float* x, int64_t m, const uint8_t* c, const uint8_t* s, const float* s2, const float* bias, "
           "const float* resid, float* out, int nt")
    head = "".join(f'#include "{h}"\n' for h in TIER_HEADERS["amx"])
    lib = toolchain.load(toolchain.build(f'{head}\n{ks.source()}\nextern "C" void entry({sig}) '
                                         f'{{ {name}(x, m, c, s, s2, bias, resid, out, nt); }}\n', "amx", "bench-q8-tiles"))
    rng = np.random.default_rng(0)
    flat = q8.Layout((n, k))
    packed, layout = q8.repack(q8.quantize(rng.standard_normal((n, k)).astype(np.float32), flat), flat)
    parts = layout.split(packed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    p = lambda a: ctypes.c_void_p(a.ctypes.data)
    call = lambda: lib.entry(p(x), ctypes.c_int64(m), p(parts["codes"]), p(parts["scales"]), None, None, None,
                             p(out), threads)
    call()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        call()
        reps += 1
    return (time.perf_counter() - t0) / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arts", type=Path, default=Path("/tmp/amxc-quant-table"))
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ghz", type=float, default=None)
    args = ap.parse_args()
    rows = {v: bench(args.arts / f"SmolLM2-135M-{v}.amxc", args.prompt, args.new, args.reps) for v in VARIANTS}
    print(f"SmolLM2-135M, {args.prompt}-token prompt, {args.new} new tokens, {os.cpu_count()} threads, median of {args.reps}:")
    print("| weights | prefill tok/s | decode tok/s |\n|---|---|---|")
    for v, r in rows.items():
        print(f"| {v} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} |")
    ghz = args.ghz
    if ghz is None:                            # the current clock /proc/cpuinfo reports (VMs hide the max)
        mhz = [float(l.split(":")[1]) for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("cpu MHz")]
        ghz = max(mhz) / 1000 if mhz else 2.0
    threads = len(os.sched_getaffinity(0))
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    per_core = next((int(l.split(":")[1]) for l in lscpu.splitlines() if l.startswith("Thread(s) per core")), 1)
    cores = max(1, threads // per_core)
    peak = cores * 1024 * 2 * ghz * 1e9           # int8 ops (multiply + add) a second
    print(f"\nq8 tile GEMM (AMX int8), m=512, {threads} threads on {cores} core(s) at {ghz:.2f} GHz, "
          f"peak {peak / 1e12:.2f} TOPS:")
    for n, k in ((1536, 576), (576, 1536), (576, 576)):
        t = tile_gemm(n, k, 512, threads)
        ops = 2 * 512 * n * k
        print(f"  N={n} K={k}: {t * 1e3:.3f} ms, {ops / t / 1e9:.0f} GOPS = {ops / t / peak:.1%} of peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())

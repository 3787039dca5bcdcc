"""One NF4 GEMV kernel on its own: time per call at a model's shapes, its weights hot (the same
matrix again, in L2/L3) and cold (30 copies in turn, one per layer, as a decode step reads
them), next to an empty call's cost (ctypes and the parallel region's fork and join).  Hot
GB/s is the kernel's compute speed, cold GB/s what it gets from memory: where hot is not far
above the read bandwidth (benchmarks/bandwidth.py), decode is bound by the kernel's
instructions as much as by memory.  A measurement, not a test.

    python benchmarks/gemv_nf4.py [--tier avx2] [--rows 1] [--threads 2]
                                  [--shapes 576x576,960x576,1536x576p,576x1536]

A shape is N x K (outputs x inputs); a trailing p is a gate/up pair (two weights, silu(g) * u).
Default shapes: SmolLM2-135M's o, fused q/k/v, gate/up and down projections.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIG = ("const int8_t* q, const float* qs, const int32_t* qsum, int64_t m, const uint8_t* w, "
       "const uint8_t* sc, const float* s2, const uint8_t* wu, const uint8_t* scu, const float* s2u, "
       "const float* bias, const float* resid, float* out, int nt")
CALL = "NAME(q, qs, qsum, m, w, sc, s2, {pair}bias, resid, out, nt)"
LAYERS = 30


def measure(tier: str, n: int, k: int, pair: bool, rows: int, threads: int, reps: int) -> str:
    from amxc.backends import reference as twin
    from support.native import build, nf4_weight, ptr

    def weights(seed0):
        return [nf4_weight(n, k, "fp8_e4m3", seed=seed0 + i) for i in range(LAYERS)]

    members = [weights(0)] + ([weights(1000)] if pair else [])
    layout = members[0][0].layout
    fn = build(tier, "gemv_nf4", dict(N=n, K=k, scale=layout.scale, scale_block=layout.scale_block, pair=pair),
               SIG, CALL.format(pair="wu, scu, s2u, " if pair else ""))
    q, qs, qsum = twin.quantize_q8(np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32))
    out = np.zeros((rows, n), np.float32)

    def args(layer: int, m: int) -> tuple:
        parts = [w[layer].layout.split(w[layer].blob) for w in members]
        mats = [ptr(p[s]) for p in parts for s in ("codes", "scales", "scales2")]
        mats += [None] * (6 - len(mats))
        return (ptr(q), ptr(qs), ptr(qsum), ctypes.c_int64(m), *mats, None, None, ptr(out), threads)

    calls = [args(i, rows) for i in range(LAYERS)]
    empty = args(0, 0)
    t = time.perf_counter()
    for _ in range(2000):
        fn(*empty)
    overhead = (time.perf_counter() - t) / 2000
    flush = np.ones(16 << 20, np.float32)                   # 64 MB: more than the L3
    hot, cold = [], []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(LAYERS):
            fn(*calls[0])
        hot.append((time.perf_counter() - t) / LAYERS)
        flush += 1.0
        t = time.perf_counter()
        for c in calls:
            fn(*c)
        cold.append((time.perf_counter() - t) / LAYERS)
    size = sum(len(w[0].blob) for w in members)
    h, c = statistics.median(hot), statistics.median(cold)
    work = lambda s: f"{s * 1e6:.1f} us ({size / max(s - overhead, 1e-9) / 1e9:.1f} GB/s)"
    return f"| {n}x{k}{' pair' if pair else ''} | {size / 1024:.0f} | {work(h)} | {work(c)} | {overhead * 1e6:.1f} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", default=None, help="kernel tier (default: this host's best integer tier)")
    ap.add_argument("--rows", type=int, default=1, help="activation rows (decode: sequences x drafted rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="576x576,960x576,1536x576p,576x1536")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))
    from amxc.backends import isa

    tier = args.tier or ("avx512" if isa.supported("avx512") else "avx2" if isa.supported("avx2") else "ref")
    print(f"# NF4 GEMV, tier {tier}, {args.rows} row(s), {args.threads} threads, median of {args.reps}; "
          "GB/s count the call's time less the empty call's")
    print("| N x K | KB a call | hot | cold (30 layers in turn) | empty call us |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        pair = shape.endswith("p")
        n, k = (int(v) for v in shape.rstrip("p").split("x"))
        print(measure(tier, n, k, pair, args.rows, args.threads, args.reps), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

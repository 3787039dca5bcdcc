"""Read bandwidth of this machine, the denominator of every roofline figure: a native streaming
loop (OpenMP threads each summing their slice of a 1 GiB float32 buffer with 8 independent
vector accumulators, built with amxc's own toolchain), cross-checked against numpy.

    python benchmarks/bandwidth.py [--threads 2] [--reps 5] [--gib 1]

GB = 1e9 bytes; the best of --reps passes after a warm-up pass (page faults excluded).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import threading
import time

import numpy as np

SOURCE = r"""
#include <omp.h>
#include <cstdint>
extern "C" double amxc_read_sum(const float* a, int64_t n, int threads) {
    double total = 0.0;
    #pragma omp parallel num_threads(threads) reduction(+:total)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t lo = n * t / nt, hi = n * (t + 1) / nt;
        float acc[8][16] = {};              // 8 x 16 lanes: enough independent adds to hide latency
        int64_t i = lo;
        for (; i + 128 <= hi; i += 128)
            for (int j = 0; j < 8; ++j)
                for (int l = 0; l < 16; ++l) acc[j][l] += a[i + 16 * j + l];
        for (; i < hi; ++i) acc[0][0] += a[i];
        for (int j = 0; j < 8; ++j)
            for (int l = 0; l < 16; ++l) total += acc[j][l];
    }
    return total;
}
"""


def native_read_GBps(threads: int, reps: int = 5, gib: float = 1.0) -> float:
    from amxc.backends import isa, toolchain
    tier = "avx512" if isa.supported("avx512") else ("avx2" if isa.supported("avx2") else "ref")
    lib = toolchain.load(toolchain.build(SOURCE, tier, "bandwidth"))
    fn = lib.amxc_read_sum
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_double
    a = np.ones(int(gib * (1 << 28)), np.float32)
    best = 0.0
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        total = fn(a.ctypes.data, a.size, threads)
        seconds = time.perf_counter() - t0
        if total != a.size:                 # the loop really read every element
            raise RuntimeError(f"native read loop summed {total}, expected {a.size}")
        if rep:                             # pass 0 is the warm-up
            best = max(best, a.nbytes / seconds / 1e9)
    return best


def numpy_read_GBps(threads: int, reps: int = 5, gib: float = 1.0) -> float:
    """`threads` Python threads each running np.sum over its slice (numpy releases the GIL)."""
    a = np.ones(int(gib * (1 << 28)), np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    for rep in range(reps + 1):
        ts = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if rep:
            best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def measure(threads: int, reps: int = 5, gib: float = 1.0) -> dict:
    native = native_read_GBps(threads, reps, gib)
    numpy = numpy_read_GBps(threads, reps, gib)
    return {"read_GBps": native, "numpy_read_GBps": numpy, "native_over_numpy": native / numpy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = measure(args.threads, args.reps, args.gib)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"read bandwidth, {args.threads} threads: native {r['read_GBps']:.1f} GB/s, numpy "
              f"{r['numpy_read_GBps']:.1f} GB/s (native/numpy {r['native_over_numpy']:.2f})")


if __name__ == "__main__":
    main()

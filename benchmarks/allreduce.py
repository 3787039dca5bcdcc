"""All-reduce latency and bandwidth of the TP communicator: amxc's shared-memory transport and
its MPI transport through the same native entry point (amxc::all_reduce_sum, timed in a native
loop, no Python per call), beside mpi4py's numpy `Allreduce(IN_PLACE)` (a Python loop: what a
Python-driven step would pay).  All three in one run, per rank count, under `mpiexec`.

    python benchmarks/allreduce.py [--ranks 2 4] [--min-bytes 4096] [--max-bytes 4194304]
                                   [--budget-s 0.5] [--spin N] [--rs-min-bytes B]
                                   [--slot-bytes B] [--json FILE]

Sizes are powers of 4 from --min-bytes to --max-bytes (float32).  Each cell runs a warm-up and
then as many iterations as fit about --budget-s (20..2000, the same on every rank); a buffer
of zeros is reduced in place (values never overflow; adds cost the same).  Latency: the median
and p90 of every rank's per-call times; bandwidth: algorithm bandwidth, bytes / median (GB =
1e9 B).  Ranks above the CPU count are oversubscribed: figures then measure the scheduler too.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SOURCE = r"""
#include "amxc_comm.h"
extern "C" int amxc_bench_all_reduce(AmxcComm* c, float* x, int64_t n, int64_t iters, double* seconds) {
  for (int64_t i = 0; i < iters; ++i) {
    const double t0 = amxc::comm::clock_s();
    if (amxc::all_reduce_sum(c, x, n)) return 1;
    seconds[i] = amxc::comm::clock_s() - t0;
  }
  return 0;
}
"""
METHODS = ("shm", "mpi-native", "mpi4py")


def host() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "loadavg": list(os.getloadavg()), "machine": platform.machine()}


def iterations(nbytes: int, budget_s: float) -> int:
    guess = budget_s / (5e-6 + nbytes / 2e9)          # ~5 us + 2 GB/s: a deliberately modest guess
    return int(min(2000, max(20, guess)))


# ---- one rank, under mpiexec ------------------------------------------------------------------

def worker(opts: dict) -> dict | None:
    import ctypes

    from mpi4py import MPI

    from amxc.backends import isa, toolchain
    from amxc.runtime.comm import MpiGroup, ShmGroup
    world = MPI.COMM_WORLD
    rank, ranks = world.Get_rank(), world.Get_size()
    lib = toolchain.load(toolchain.build(SOURCE, isa.best_tier(), "bench_allreduce")) if rank == 0 else None
    world.Barrier()                                   # rank 0 built it: the others load it cached
    if lib is None:
        lib = toolchain.load(toolchain.build(SOURCE, isa.best_tier(), "bench_allreduce"))
    lib.amxc_bench_all_reduce.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_void_p]
    settings = {k: opts[k] for k in ("spin",) if opts.get(k) is not None}
    group = {k: opts[k] for k in ("rs_min_bytes",) if opts.get(k) is not None}
    if rank == 0:
        shm = ShmGroup.create(ranks, slot_bytes=opts["slot_bytes"] or max(opts["max_bytes"], 4096),
                              **group, **settings)
        world.bcast(shm.name, root=0)
    else:
        shm = ShmGroup.attach(world.bcast(None, root=0), rank, ranks, **settings)
    shm.join(timeout_s=60)
    mpi = MpiGroup()

    rows = []
    nbytes = opts["min_bytes"]
    while nbytes <= opts["max_bytes"]:
        n = nbytes // 4
        iters = iterations(nbytes, opts["budget_s"])
        warm = max(5, iters // 10)
        x = np.zeros(n, np.float32)
        for method in METHODS:
            times = np.empty(warm + iters)
            world.Barrier()
            if method == "mpi4py":
                for i in range(warm + iters):
                    t0 = time.perf_counter()
                    world.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
                    times[i] = time.perf_counter() - t0
            else:
                g = shm if method == "shm" else mpi
                if lib.amxc_bench_all_reduce(g.address, x.ctypes.data, n, warm + iters, times.ctypes.data):
                    raise RuntimeError(g.comm.error.decode())
            everyone = world.gather(times[warm:], root=0)
            if rank == 0:
                everyone = np.concatenate(everyone)
                med, p90 = np.median(everyone), np.percentile(everyone, 90)
                rows.append({"ranks": ranks, "bytes": nbytes, "method": method, "iters": iters,
                             "median_us": med * 1e6, "p90_us": p90 * 1e6, "algbw_gbs": nbytes / med / 1e9})
        nbytes *= 4
    shm.close()
    mpi.close()
    return {"rows": rows} if rank == 0 else None


# ---- the launcher -----------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    lines = [f"{'ranks':>5} {'bytes':>9}  " + "  ".join(f"{m:>26}" for m in METHODS),
             f"{'':>5} {'':>9}  " + "  ".join(f"{'median / p90 us   GB/s':>26}" for _ in METHODS)]
    cells = {(r["ranks"], r["bytes"], r["method"]): r for r in rows}
    for ranks, nbytes in sorted({(r["ranks"], r["bytes"]) for r in rows}):
        parts = []
        for m in METHODS:
            r = cells.get((ranks, nbytes, m))
            parts.append(f"{r['median_us']:8.1f} /{r['p90_us']:8.1f} {r['algbw_gbs']:7.2f}" if r else f"{'-':>26}")
        size = f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"
        lines.append(f"{ranks:>5} {size:>9}  " + "  ".join(f"{p:>26}" for p in parts))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--min-bytes", type=int, default=4 << 10)
    ap.add_argument("--max-bytes", type=int, default=4 << 20)
    ap.add_argument("--budget-s", type=float, default=0.5, help="time per cell (default 0.5)")
    ap.add_argument("--spin", type=int, default=None, help="shm: pauses per yield (default: comm.py's)")
    ap.add_argument("--rs-min-bytes", type=int, default=None, help="shm: reduce-scatter from this size")
    ap.add_argument("--slot-bytes", type=int, default=None, help="shm: slot size (default: --max-bytes)")
    ap.add_argument("--json", type=Path, default=None, help="write the host and figures here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        try:
            out = worker(json.loads(args.worker))
        except BaseException:
            import traceback

            from mpi4py import MPI
            traceback.print_exc()
            MPI.COMM_WORLD.Abort(1)                    # not a hang in the others' waits
        
        if out is not None:
            print(json.dumps(out), flush=True)
        return 0

    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    if importlib.util.find_spec("mpi4py") is None:
        mpiexec = None
    if not mpiexec:
        print("allreduce.py: error: needs mpi4py and mpiexec (pip install mpi4py mpich)", file=sys.stderr)
        return 2
    info = host()
    print(f"host: {info['cpu']}, {info['cpus']} CPUs ({info['usable_cpus']} usable), "
          f"load average {' '.join(f'{v:.2f}' for v in info['loadavg'])}")
    opts = {"min_bytes": args.min_bytes, "max_bytes": args.max_bytes, "budget_s": args.budget_s,
            "spin": args.spin, "rs_min_bytes": args.rs_min_bytes, "slot_bytes": args.slot_bytes}
    rows = []
    t0 = time.time()
    for ranks in args.ranks:
        proc = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker", json.dumps(opts)],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            print(f"allreduce.py: error: {ranks} ranks failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows += json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    print(table(rows))
    print(f"({time.time() - t0:.0f} s; load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())})")
    if args.json:
        args.json.write_text(json.dumps({"host": info, "options": opts, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

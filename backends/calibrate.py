"""Native pieces of calibration, handed to the passes by amxc.api (passes import no backend).

`native_gptq_sweep()` is passes/gptq.sweep_numpy in C++ (templates/gptq_sweep.cpp.j2), built
for this host's best tier through the kernel cache: the sweep visits every column of every
weight in turn, which numpy runs as one Python iteration per column (about 45 s of SmolLM2's
calibration, 8 minutes of TinyLlama's) and the native code as a 16-row-wide triangular update
on all threads.  It works in float32 (as GPTQ's reference does on the GPU) where numpy's works
in float64: codes agree to well over 99 %, output errors to 1 % (tests/backends/test_calibrate.py).
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np

from amxc.ir.formats import nf4

from . import isa, toolchain
from .cxx import c_float
from .kernels import render

_f32p, _i32p, _u8p = (np.ctypeslib.ndpointer(t, flags="C_CONTIGUOUS") for t in (np.float32, np.int32, np.uint8))


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    tier = isa.best_tier()
    source = render("gptq_sweep.cpp.j2", table=[c_float(float(v)) for v in nf4.TABLE],
                    midpoints=[c_float(float(v)) for v in nf4.MIDPOINTS])
    lib = toolchain.load(toolchain.build(source, "avx512" if tier == "amx" else tier, name="gptq_sweep"))
    fn = lib.amxc_gptq_sweep
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64, ctypes.c_int64, _f32p, _f32p, _f32p, ctypes.c_int64, _i32p, _u8p]
    return lib


def native_gptq_sweep():
    """The native column sweep, built (or taken from the cache) now; same contract as
    passes/gptq.sweep_numpy (its `lazy` argument is ignored: the native sweep needs no batching)."""
    fn = _library().amxc_gptq_sweep

    def sweep(w: np.ndarray, u: np.ndarray, scale: np.ndarray, column_block: np.ndarray,
              lazy: int = 128) -> np.ndarray:
        n, k = w.shape
        if u.shape != (k, k) or scale.shape[0] != n or column_block.shape != (k,):
            raise ValueError(f"gptq sweep: w {w.shape}, u {u.shape}, scale {scale.shape} and "
                             f"column_block {column_block.shape} do not agree")
        codes = np.empty((n, k), np.uint8)
        rc = fn(n, k, np.ascontiguousarray(w, np.float32), np.ascontiguousarray(u, np.float32),
                np.ascontiguousarray(scale, np.float32), scale.shape[1],
                np.ascontiguousarray(column_block, np.int32), codes)
        if rc != 0:
            raise ValueError(f"gptq sweep: the native sweep refused its arguments (code {rc})")
        return codes

    return sweep

"""Native pieces of calibration, handed to the passes by amxc.api (passes import no backend).

Both are passes/gptq.py's numpy references in C++ (templates/gptq.cpp.j2), built for this host's
best tier through the kernel cache:

`native_gptq_sweep()` (sweep_numpy) visits every column of every weight in turn, which numpy
runs as one Python iteration per column (about 45 s of SmolLM2's calibration, 8 minutes of
TinyLlama's) and the native code as 16-row-wide updates on all threads, 8 columns at a time.
It works in float32 (as GPTQ's reference does on the GPU) where numpy's works in float64: codes
agree to well over 99 %, output errors to 1 % (tests/backends/test_calibrate.py).

`native_bf16_gemm()` (passes/calibration.bf16_gemm_numpy) is the calibration run's GEMM on
AVX-512 BF16 (`vdpbf16ps`): float32 inputs rounded to bf16, float32 sums.  SmolLM2's calibration
products ran at 160-200 GFLOP/s in numpy's float32 BLAS on a Zen 4's 2 cores.

`native_block_scales()` (block_scales_numpy) tries each E4M3 scale candidate of each block in
float64 as numpy does, one block at a time instead of 11 passes over whole-matrix temporaries.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np

from amxc.ir.formats import e4m3, nf4

from . import isa, toolchain
from .cxx import c_float
from .kernels import render

_f32p, _f64p, _i32p, _u8p = (np.ctypeslib.ndpointer(t, flags="C_CONTIGUOUS")
                             for t in (np.float32, np.float64, np.int32, np.uint8))


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    tier = isa.best_tier()
    source = render("gptq.cpp.j2", table=[c_float(float(v)) for v in nf4.TABLE],
                    midpoints=[c_float(float(v)) for v in nf4.MIDPOINTS],
                    below=[int(v) for v in nf4._BELOW])
    lib = toolchain.load(toolchain.build(source, "avx512" if tier == "amx" else tier, name="gptq"))
    lib.amxc_gptq_sweep.restype = ctypes.c_int
    lib.amxc_gptq_sweep.argtypes = [ctypes.c_int64, ctypes.c_int64, _f32p, _f32p, _f32p, ctypes.c_int64,
                                    _i32p, _u8p]
    lib.amxc_gptq_block_scales.restype = ctypes.c_int
    lib.amxc_gptq_block_scales.argtypes = [ctypes.c_int64, ctypes.c_int64, _f64p, _f32p, _u8p, _f64p,
                                           ctypes.c_int32, _f32p, _u8p, _f64p]
    return lib


def native_gptq_sweep():
    """The native column sweep, built (or taken from the cache) now; same contract as
    passes/gptq.sweep_numpy (its `lazy` argument is ignored: the native sweep batches its own)."""
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


def native_block_scales():
    """The native block-scale search, built (or taken from the cache) now; same contract as
    passes/gptq.block_scales_numpy (f32 scales, which need no search, go to numpy's)."""
    from amxc.passes.gptq import absmax_codes, block_scales_numpy

    fn = _library().amxc_gptq_block_scales
    values = np.ascontiguousarray(e4m3.DECODE[:e4m3.NAN_CODE], np.float32)

    def block_scales(w: np.ndarray, s2_row: np.ndarray | None, h_diag: np.ndarray, search: int):
        if s2_row is None:
            return block_scales_numpy(w, s2_row, h_diag, search)
        n, k = w.shape
        nb = k // 64
        if k % 64 or s2_row.shape != (n, nb) or h_diag.shape != (k,) or search < 0:
            raise ValueError(f"gptq block scales: w {w.shape}, s2 {s2_row.shape}, h {h_diag.shape} "
                             f"and search {search} do not agree")
        s2 = np.ascontiguousarray(s2_row, np.float32)
        q0 = absmax_codes(w, s2)
        best_q, best_d = np.empty((n, nb), np.uint8), np.empty((n, nb), np.float64)
        rc = fn(n, nb, np.ascontiguousarray(w, np.float64), s2, np.ascontiguousarray(q0, np.uint8),
                np.ascontiguousarray(h_diag, np.float64), search, values, best_q, best_d)
        if rc != 0:
            raise ValueError(f"gptq block scales: the native search refused its arguments (code {rc})")
        return best_q, best_d

    return block_scales


@lru_cache(maxsize=1)
def _bf16_library() -> ctypes.CDLL:
    lib = toolchain.load(toolchain.build(render("gemm_bf16.cpp.j2"), "avx512", name="gemm_bf16"))
    lib.amxc_gemm_bf16.restype = ctypes.c_int
    lib.amxc_gemm_bf16.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _f32p, ctypes.c_int64,
                                   _f32p, ctypes.c_int64, _f32p, ctypes.c_int64]
    return lib


def native_bf16_gemm():
    """The bf16 GEMM, built (or taken from the cache) now, for a host that runs the avx512 tier
    (all of which multiply bf16: AVX-512 BF16); the contract of passes/calibration.bf16_gemm_numpy,
    a @ b of a [m, k] and b [k, n], float32 out."""
    if not isa.supported("avx512"):
        raise OSError(f"the bf16 GEMM needs the avx512 tier; this host lacks {', '.join(isa.missing('avx512'))}")
    fn = _bf16_library().amxc_gemm_bf16

    def gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"bf16 gemm: a {a.shape} @ b {b.shape} do not conform")
        rows, cols = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b.T, np.float32)
        out = np.empty((a.shape[0], b.shape[1]), np.float32)
        m, k = rows.shape
        if fn(m, out.shape[1], k, rows, k, cols, k, out, out.shape[1]) != 0:
            raise ValueError(f"bf16 gemm: the native GEMM refused {a.shape} @ {b.shape}")
        return out

    return gemm

"""The fp32 GEMM (NF4 panels decoded once, or f32 weights) of every tier (an item per tier on
every host; skipped, naming the missing CPU flags, where the host lacks one): rel-RMS <= 1e-5
against numpy fp64 (the exact path's tolerance; fp32 accumulation over K), and bit-identical to
the scalar ref tier at 1 and 2 threads (one fma chain per output, k in order, in every tier).
The kernels read the r16k4 repack of an NF4 weight; the fp64 oracle reads the flat
dequantization of the ORIGINAL bytes (support.native.nf4_weight).  On the amx tier these are
the avx512 GEMMs it runs below TILE_ROWS rows; its tile GEMMs are in test_amx.py."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from support.native import ALL_TIERS, build, nf4_weight, ptr

EXACT_TOL = 1e-5


def run(tier, weight, n, k, x, blob_or_w, layout, bias, resid, nt=2):
    m = x.shape[0]
    out = np.zeros((m, n), np.float32)
    if weight == "nf4":
        params = dict(N=n, K=k, scale=layout.scale, scale_block=layout.scale_block)
        fn = build(tier, "gemm_nf4", params,
                   "const float* x, int64_t m, const uint8_t* c, const uint8_t* s, const float* s2, "
                   "const float* bias, const float* resid, float* out, int nt",
                   "NAME(x, m, c, s, s2, bias, resid, out, nt)")
        parts = layout.split(blob_or_w)
        fn(ptr(x), ctypes.c_int64(m), ptr(parts["codes"]), ptr(parts["scales"]), ptr(parts.get("scales2")),
           ptr(bias), ptr(resid), ptr(out), nt)
    else:
        fn = build(tier, "gemm_f32", dict(N=n, K=k),
                   "const float* x, int64_t m, const float* w, const float* bias, const float* resid, "
                   "float* out, int nt", "NAME(x, m, w, bias, resid, out, nt)")
        fn(ptr(x), ctypes.c_int64(m), ptr(blob_or_w), ptr(bias), ptr(resid), ptr(out), nt)
    return out


CASES = [("nf4", 40, 128, 13, "fp8_e4m3"), ("nf4", 16, 64 * 300, 3, "fp8_e4m3"), ("nf4", 33, 640, 1, "f32"),
         ("f32", 37, 100, 7, None), ("f32", 64, 300, 14, None)]


@pytest.mark.parametrize("weight, n, k, m, scale", CASES)
@pytest.mark.parametrize("tier", ALL_TIERS, indirect=True)
def test_gemm_against_fp64_and_the_ref_tier(tier, weight, n, k, m, scale):
    rng = np.random.default_rng(n * k)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    resid = rng.standard_normal((m, n)).astype(np.float32)
    layout = None
    if weight == "nf4":
        wt = nf4_weight(n, k, scale, seed=n * k)
        data, layout, w_eff = wt.blob, wt.layout, wt.dequantized()     # kernel: repack; oracle: flat
    else:
        data, w_eff = w, w
    want = x.astype(np.float64) @ w_eff.astype(np.float64).T + bias + resid
    ref = run("ref", weight, n, k, x, data, layout, bias, resid, 1)
    for nt in (1, 2):
        out = run(tier, weight, n, k, x, data, layout, bias, resid, nt)
        err = float(np.sqrt(((out - want) ** 2).mean() / (want ** 2).mean()))
        assert err <= EXACT_TOL, (tier, nt, err)
        assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), \
            f"{tier} at {nt} threads differs from ref: max diff {np.abs(out - ref).max()}"

"""The fp32 GEMM (NF4 panels decoded once, or f32 weights) of every tier: rel-RMS <= 1e-5 against
numpy fp64 on the same decoded weight (the exact path's tolerance; fp32 accumulation over K),
and bit-identical across tiers and thread counts (one fma chain per output, k in order)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from amxc.ir.formats import nf4
from support.native import build, ptr, runnable_tiers

EXACT_TOL = 1e-5
TIERS = [t for t in runnable_tiers() if t != "amx"]      # amx GEMMs are the tile kernels: test_amx.py


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
def test_gemm_against_fp64_and_across_tiers(weight, n, k, m, scale):
    rng = np.random.default_rng(n * k)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    resid = rng.standard_normal((m, n)).astype(np.float32)
    layout = None
    if weight == "nf4":
        flat = nf4.Layout((n, k), 64, scale, 256)
        data, layout = nf4.repack(nf4.quantize(w, flat), flat)
        w_eff = layout.dequantize(data)
    else:
        data, w_eff = w, w
    want = x.astype(np.float64) @ w_eff.astype(np.float64).T + bias + resid
    outs = {}
    for tier in TIERS:
        for nt in (1, 2):
            out = run(tier, weight, n, k, x, data, layout, bias, resid, nt)
            err = float(np.sqrt(((out - want) ** 2).mean() / (want ** 2).mean()))
            assert err <= EXACT_TOL, (tier, err)
            outs[(tier, nt)] = out
    first = next(iter(outs.values()))
    for key, out in outs.items():
        assert np.array_equal(out, first), f"{key} differs from {next(iter(outs))}"

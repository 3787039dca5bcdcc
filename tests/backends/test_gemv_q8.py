"""q8 weights (int8 codes, f32 block-64 absmax: ir/formats/q8.py) on every tier.

The int8 GEMV (the NF4 GEMV templates with codes="q8") against its Python twin
reference.gemv_q8_q8 (bit-exact: integer dots, the same fp32 scaling order) and against numpy
fp64 on the float weight within the rounding bound: each activation moves by at most half its
block's step (amax / 254), each weight likewise (absmax / 254), so per output
|y - x.w| <= |w|.dx + |x|.dw + dx.dw, plus 1e-5 relative for fp32 sums; the fp32 kernel (gemv="exact") against fp64
within 1e-5 relative RMS (fp32 dot products of K <= 1024 terms).  The kernels read the r16k4
pack; the twin and the oracle read the flat bytes, so a wrong repack fails here."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from amxc.backends import reference as twin
from amxc.ir.formats import q8
from support.native import ALL_TIERS, KERNEL_TIERS, build, ptr

SIG = ("const int8_t* q, const float* qs, const int32_t* qsum, int64_t m, const uint8_t* w, "
       "const uint8_t* sc, const float* s2, const float* bias, const float* resid, float* out, int nt")
CALL = "NAME(q, qs, qsum, m, w, sc, s2, bias, resid, out, nt)"
F32_SIG = ("const float* x, int64_t m, const uint8_t* w, const uint8_t* sc, const float* bias, "
           "const float* resid, float* out, int nt")
F32_CALL = "NAME(x, m, w, sc, bias, resid, out, nt)"


def rel_rms(a, b):
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


def rounding_bound(x, w):
    """Largest |x.w - x'.w'| when x' and w' round x and w to 127 levels per block of 64."""
    dx = np.repeat(np.abs(x.reshape(len(x), -1, 64)).max(2) / 254, 64, axis=1).astype(np.float64)
    dw = np.repeat(np.abs(w.reshape(len(w), -1, 64)).max(2) / 254, 64, axis=1).astype(np.float64)
    return dx @ np.abs(w.T).astype(np.float64) + np.abs(x).astype(np.float64) @ dw.T + dx @ dw.T


def weight(n, k, seed):
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    w[0, :64] *= 30                                   # an outlier block
    flat = q8.Layout((n, k))
    blob = q8.quantize(w, flat)
    packed, layout = q8.repack(blob, flat)
    return w, flat, blob, layout, packed


def test_format_round_trip_and_error():
    w, flat, blob, layout, packed = weight(37, 192, 0)
    assert flat.nbytes == 37 * 192 + 37 * 3 * 4
    deq = flat.dequantize(blob)
    assert np.array_equal(deq, layout.dequantize(packed))            # repack keeps every value
    assert np.array_equal(flat.codes(blob), layout.codes(packed))
    bound = np.repeat(np.abs(w.reshape(37, 3, 64)).max(2) / 254, 64, axis=1) * (1 + 1e-5)
    assert (np.abs(deq - w) <= bound).all()                          # half a step per element
    assert np.abs(flat.codes(blob)).max() == 127


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match="multiple of 64"):
        q8.Layout((4, 100))
    with pytest.raises(ValueError, match="block must be 64"):
        q8.Layout((4, 128), block=32)
    with pytest.raises(ValueError, match="storage has 3 bytes"):
        q8.Layout((4, 64)).split(np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        q8.quantize(np.full((1, 64), np.nan, np.float32), q8.Layout((1, 64)))


@pytest.mark.parametrize("tier", KERNEL_TIERS, indirect=True)
@pytest.mark.parametrize("n, k, m", [(48, 128, 1), (37, 320, 3), (96, 576, 16), (20, 64, 9),
                                     (100, 256, 37), (64, 128, 130)])   # prefill: avx512 tiles and remainders
def test_gemv_q8(tier, n, k, m):
    w, flat, blob, layout, packed = weight(n, k, seed=n + k)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    resid = rng.standard_normal((m, n)).astype(np.float32)
    q, qs, qsum = twin.quantize_q8(x)
    parts = layout.split(packed)
    fn = build(tier, "gemv_q8", dict(N=n, K=k), SIG, CALL)
    out = np.full((m, n), np.nan, np.float32)
    fn(ptr(q), ptr(qs), ptr(qsum), ctypes.c_int64(m), ptr(parts["codes"]), ptr(parts["scales"]), None,
       ptr(bias), ptr(resid), ptr(out), 2)
    want = twin.gemv_q8_q8(q, qs, qsum, flat, blob, bias, resid)
    assert np.array_equal(out, want), f"max diff {np.abs(out - want).max()}"
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + bias + resid
    assert np.all(np.abs(out - exact) <= rounding_bound(x, w) + 1e-5 * (np.abs(exact) + 1))


@pytest.mark.parametrize("tier", ALL_TIERS, indirect=True)
def test_gemm_q8_fp32(tier):
    n, k, m = 37, 320, 5
    w, flat, blob, layout, packed = weight(n, k, seed=7)
    x = np.random.default_rng(2).standard_normal((m, k)).astype(np.float32)
    parts = layout.split(packed)
    fn = build(tier, "gemm_q8", dict(N=n, K=k), F32_SIG, F32_CALL)
    out = np.full((m, n), np.nan, np.float32)
    fn(ptr(x), ctypes.c_int64(m), ptr(parts["codes"]), ptr(parts["scales"]), None, None, ptr(out), 2)
    exact = x.astype(np.float64) @ flat.dequantize(blob).T.astype(np.float64)
    assert rel_rms(out, exact) <= 1e-5
    one = np.full((1, n), np.nan, np.float32)                        # a row's bits do not depend on m
    fn(ptr(x[3:4]), ctypes.c_int64(1), ptr(parts["codes"]), ptr(parts["scales"]), None, None, ptr(one), 1)
    assert np.array_equal(one[0], out[3])

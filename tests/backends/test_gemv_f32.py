"""The f32-weight GEMV (decode rows of unquantized linears on the int8 path:
backends/templates/gemv_f32_ref.cpp.j2, and gemv_f32_simd.cpp.j2 for avx2 and avx512;
y[m, n] = dot(x[m], W[n]) (+ bias[n]) (+ resid[m, n])) on every tier, against numpy fp64.

Tolerance, per output element, a worst-case bound rather than a fitted number:

    |y - y64| <= (gamma_D + (K + 2) * 2^-53) * (sum_k |x_k W_nk| + |bias_n| + |resid_mn|)

with gamma_D = D u / (1 - D u), u = 2^-24 (fp32 round to nearest) and D = K//16 + 4 + K%16 + 2
the most roundings any term goes through in the kernel: amxc::dot (backends/include/amxc_rt.h)
runs 16 lane chains of K//16 fmas, folds them 8-4-2-1 (4 adds), fmas the K%16 tail in order,
then the epilogue adds bias and resid (2 more).  For a summation whose every term passes
through at most D roundings the error is at most gamma_D times the sum of the terms' absolute
values (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §4.2; an fma rounds
once, a product feeding an add is exact in it).  The second term bounds the fp64 oracle's own
error (K + 2 roundings at 2^-53).  Summing a 16-block twice or dropping one is off by about
|x| |W| sqrt(16) >> gamma_D * sum, so the bound is tight enough to catch it; a changed summation
order is not, which is why every tier must also equal the scalar ref tier bit for bit (the
templates promise "the same bits in every tier"), at 1 and 2 threads.

Shapes: N and K multiples of 16 and not, K < 16 (tail only); m = 1..4, 9 and 16; with and
without bias and residual.  The output buffer is NaN-filled with a guard tail: every output is
written and nothing past it.

Also here: the CI guard test_expected_tiers_are_present ($AMXC_EXPECT_TIERS)."""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np
import pytest

from amxc.backends import isa
from support import native
from support.native import ALL_TIERS, EXPECT_ENV, build, build_many, ptr

SHAPES = [(37, 100), (48, 64), (5, 7), (33, 257), (16, 1000)]       # (N, K)
SIG = ("const float* x, int64_t m, const float* w, const float* bias, const float* resid, "
       "float* out, int nt")
CALL = "NAME(x, m, w, bias, resid, out, nt)"
U32, U64 = 2.0 ** -24, 2.0 ** -53
GUARD = 16


@functools.lru_cache(maxsize=None)
def kernels(tier: str) -> dict:
    """All SHAPES' gemv_f32 kernels of `tier`, one compile."""
    fns = build_many(tier, "gemv_f32", [dict(N=n, K=k) for n, k in SHAPES], SIG, CALL)
    return dict(zip(SHAPES, fns))


def run(tier, x, w, bias, resid, nt):
    m, (n, k) = x.shape[0], w.shape
    buf = np.full(m * n + GUARD, np.nan, np.float32)
    kernels(tier)[n, k](ptr(x), ctypes.c_int64(m), ptr(w), ptr(bias), ptr(resid), ptr(buf), nt)
    assert np.isnan(buf[m * n:]).all(), "the kernel wrote past its output"
    out = buf[:m * n].reshape(m, n)
    assert not np.isnan(out).any(), "some outputs were not written"
    return out


def bound(x, w, bias, resid):
    k = w.shape[1]
    d = k // 16 + 4 + k % 16 + 2
    gamma = d * U32 / (1 - d * U32)
    mag = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    if bias is not None:
        mag = mag + np.abs(bias.astype(np.float64))
    if resid is not None:
        mag = mag + np.abs(resid.astype(np.float64))
    return (gamma + (k + 2) * U64) * mag


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("tier", ALL_TIERS, indirect=True)
def test_gemv_f32_against_fp64_and_the_ref_tier(tier, n, k):
    rng = np.random.default_rng(n * 1000 + k)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    for m in (1, 2, 3, 4, 9, 16):          # 9, 16: a batched decode step (rows 8 at a time)
        x = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        r = rng.standard_normal((m, n)).astype(np.float32)
        for bias, resid in ((None, None), (b, None), (None, r), (b, r)):
            want = x.astype(np.float64) @ w.astype(np.float64).T
            want = want + (0 if bias is None else bias) + (0 if resid is None else resid)
            tol = bound(x, w, bias, resid)
            ref = run("ref", x, w, bias, resid, 1)
            for nt in (1, 2):
                out = run(tier, x, w, bias, resid, nt)
                err = np.abs(out.astype(np.float64) - want)
                what = f"m={m} bias={bias is not None} resid={resid is not None} nt={nt}"
                assert (err <= tol).all(), f"{what}: error {err.max():.3g} over the bound (max ratio " \
                                           f"{(err / tol).max():.3g})"
                assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), \
                    f"{what}: {tier} differs from ref by up to {np.abs(out - ref).max():.3g}"


def test_expected_tiers_are_present():
    """CI guard: with AMXC_EXPECT_TIERS=avx2,avx512,... set, a host that cannot run one of them
    fails here (and every item of that tier fails instead of skipping)."""
    if not os.environ.get(EXPECT_ENV, "").strip():
        pytest.skip(f"{EXPECT_ENV} is not set: no tier is required of this host")
    problems = native.expected_but_missing()
    assert not problems, "; ".join(problems)


def test_the_tier_guard_on_an_avx2_only_host(monkeypatch):
    """On a host with AVX2 but no AVX-512: avx512 and amx items skip naming the missing flags;
    AMXC_EXPECT_TIERS naming them turns that into a failure, and an unknown name is an error."""
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"sse2", "avx2", "fma", "f16c", "bmi2"}))
    monkeypatch.delenv(EXPECT_ENV, raising=False)
    assert native.runnable_tiers() == ["ref", "avx2", isa.EMULATED]
    for tier in ("ref", "avx2", isa.EMULATED):
        assert native.require_tier(tier) == tier
    with pytest.raises(pytest.skip.Exception, match=r"tier avx512: missing avx512_bf16, avx512_vnni, avx512bw"):
        native.require_tier("avx512")
    with pytest.raises(pytest.skip.Exception, match=r"tier amx: missing amx_bf16, amx_int8, amx_tile, avx512"):
        native.require_tier("amx")

    monkeypatch.setenv(EXPECT_ENV, "avx2, amx")
    assert native.require_tier("avx2") == "avx2"
    with pytest.raises(pytest.skip.Exception):
        native.require_tier("avx512")                  # not expected: still a skip
    with pytest.raises(pytest.fail.Exception, match=r"tier amx: missing amx_bf16.*AMXC_EXPECT_TIERS requires it"):
        native.require_tier("amx")
    problems = native.expected_but_missing()
    assert len(problems) == 1 and "tier amx: missing amx_bf16, amx_int8, amx_tile" in problems[0]

    monkeypatch.setenv(EXPECT_ENV, "avx2,avx-512")
    with pytest.raises(ValueError, match="unknown tier.*avx-512"):
        native.expected_but_missing()


SIG64 = SIG.replace("float* out", "double* out")


@pytest.mark.parametrize("tier", ALL_TIERS, indirect=True)
def test_gemv_f32_acc64_is_exact_to_float64_and_does_not_depend_on_the_cut(tier):
    """The f32 row-parallel GEMV of quantized models (amxc::dot64): float64 sums of exact
    products, within K * 2^-53 of numpy's float64 before the one rounding, so the rounded float
    is the same whether K is whole or cut across ranks whose float64 partials are added (bias on
    the first), and the same on every tier (one lane order)."""
    n, k, m = 37, 172, 5
    rng = np.random.default_rng(4)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    resid = rng.standard_normal((m, n)).astype(np.float32)
    whole = build(tier, "gemv_f32_acc64", dict(N=n, K=k, out64=False), SIG, CALL)
    out = np.full((m, n), np.nan, np.float32)
    whole(ptr(x), ctypes.c_int64(m), ptr(w), ptr(bias), ptr(resid), ptr(out), 2)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    np.testing.assert_array_equal(out, (exact.astype(np.float32) + resid).astype(np.float32))
    ref = build("ref", "gemv_f32_acc64", dict(N=n, K=k, out64=False), SIG, CALL)
    out_ref = np.full((m, n), np.nan, np.float32)
    ref(ptr(x), ctypes.c_int64(m), ptr(w), ptr(bias), ptr(resid), ptr(out_ref), 1)
    np.testing.assert_array_equal(out, out_ref)
    for cut in ([86, 86], [43, 43, 43, 43]):
        total, at = np.zeros((m, n), np.float64), 0
        for i, width in enumerate(cut):
            part = build(tier, "gemv_f32_acc64", dict(N=n, K=width, out64=True), SIG64, CALL)
            p64 = np.full((m, n), np.nan, np.float64)
            xs, ws = np.ascontiguousarray(x[:, at:at + width]), np.ascontiguousarray(w[:, at:at + width])
            part(ptr(xs), ctypes.c_int64(m), ptr(ws), ptr(bias if i == 0 else None), None, ptr(p64), 2)
            total, at = total + p64, at + width
        np.testing.assert_array_equal((total.astype(np.float32) + resid).astype(np.float32), out)

"""The vector e^x of the silu(gate) * up epilogues (amxc_avx2.h exp_x8, amxc_avx512.h exp_x16)
against float64 numpy: within 2 ulp of the float64 value rounded to float32 over the whole range
where the result is neither 0 nor inf (subnormal results: within 2 units of 2^-149), the IEEE
ends (overflow to inf, underflow to 0, NaN kept), and the two headers' bits equal, which the
AMX-vs-emulator whole-model tests rely on (amx builds with avx512's header, the emulator with
avx2's)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from amxc.backends import toolchain
from amxc.backends.kernels import TIER_HEADERS
from support.native import ptr

LANES = {"avx2": ("exp_x8", "__m256", "_mm256", 8), "avx512": ("exp_x16", "__m512", "_mm512", 16)}


def vector_exp(tier: str):
    fn, vec, p, lanes = LANES[tier]
    head = "".join(f'#include "{h}"\n' for h in TIER_HEADERS[tier])
    src = (f'{head}extern "C" void run(const float* x, float* y, int64_t n) {{\n'
           f'  for (int64_t i = 0; i < n; i += {lanes}) {p}_storeu_ps(y + i, amxc::{fn}({p}_loadu_ps(x + i)));\n}}\n')
    run = toolchain.load(toolchain.build(src, tier, f"test-{fn}")).run

    def apply(x: np.ndarray) -> np.ndarray:
        pad = np.zeros(-(-len(x) // lanes) * lanes, np.float32)
        pad[:len(x)] = x
        out = np.empty_like(pad)
        run(ptr(pad), ptr(out), ctypes.c_int64(len(pad)))
        return out[:len(x)]
    return apply


def sweep() -> np.ndarray:
    rng = np.random.default_rng(0)
    dense = np.linspace(-110.0, 95.0, 400_003, dtype=np.float32)
    near_zero = rng.standard_normal(50_000).astype(np.float32) * np.float32(1e-3)
    ends = np.array([88.72, 88.73, -87.33, -103.97, -103.9, 0.0, -0.0, 1e-30, -1e-30], np.float32)
    return np.concatenate([dense, near_zero, ends])


@pytest.mark.parametrize("tier", ["avx2", "avx512"], indirect=True)
def test_vector_exp_is_within_2_ulp(tier):
    x = sweep()
    got = vector_exp(tier)(x)
    exact = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        want = exact.astype(np.float32)
    finite = np.isfinite(want) & (want > 0)
    ulp = np.maximum(np.spacing(np.abs(want[finite])).astype(np.float64), 2.0 ** -149)
    err = np.abs(got[finite].astype(np.float64) - exact[finite]) / ulp
    assert err.max() <= 2.0, f"{err.max():.2f} ulp at x = {x[finite][err.argmax()]!r}"
    assert np.all(got[want == np.inf] == np.inf)
    assert np.all(got[want == 0] <= 2.0 ** -148)


@pytest.mark.parametrize("tier", ["avx2", "avx512"], indirect=True)
def test_vector_exp_ends(tier):
    got = vector_exp(tier)(np.array([np.inf, -np.inf, np.nan, 89.0, 1e4, -1e4, -104.0], np.float32))
    assert got[0] == np.inf and got[1] == 0.0 and np.isnan(got[2])
    assert got[3] == np.inf and got[4] == np.inf and got[5] == 0.0 and got[6] == 0.0


@pytest.mark.parametrize("tier", ["avx512"], indirect=True)
def test_avx2_and_avx512_exp_give_the_same_bits(tier):
    x = sweep()
    a, b = vector_exp("avx2")(x), vector_exp("avx512")(x)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))

"""The native KV-row stores and loads of the packed cache storages (amxc_rt.h kv16_store /
kv16_load, kv8_store / kv8_load) against their reference, ir/ops/cache.py kv_quantize and
kv_dequantize, bit for bit on every tier: F16C on avx2 and up, _Float16 on the scalar tier.
The whole-model tests (tests/runtime/test_kv_storage.py) compare logits, where a key whose
float32 value differs in its last bit between interpreter and kernels may round to the
neighbouring code; here the inputs are the same floats, so the stored bits must be too."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from amxc.backends import toolchain
from amxc.backends.kernels import TIER_HEADERS
from amxc.ir.ops.cache import kv_dequantize, kv_quantize
from amxc.ir.types import row_words
from support.native import ptr

D = 64


def row_codec(tier: str, storage: str):
    """(store, load) through the tier's native functions, over rows of D values."""
    head = "".join(f'#include "{h}"\n' for h in TIER_HEADERS[tier])
    kind = {"f16": "amxc::KV_F16", "i8": "amxc::KV_I8"}[storage]
    src = (f"{head}"
           f'extern "C" void store(const float* x, float* rows, int64_t n) {{\n'
           f"  for (int64_t j = 0; j < n; ++j) amxc::kv_store({kind}, x + j * {D}, {D}, rows + j * {row_words(storage, D)});\n}}\n"
           f'extern "C" void load(const float* rows, float* x, int64_t n) {{\n'
           f"  amxc::kv_load({kind}, rows, n, {D}, {row_words(storage, D)}, x);\n}}\n")
    lib = toolchain.load(toolchain.build(src, "avx512" if tier == "amx" else tier, f"test-kv-rows-{storage}"))

    def store(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32).reshape(-1, D)
        rows = np.zeros((len(x), row_words(storage, D)), np.float32)
        lib.store(ptr(x), ptr(rows), ctypes.c_int64(len(x)))
        return rows

    def load(rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), D), np.float32)
        lib.load(ptr(np.ascontiguousarray(rows)), ptr(out), ctypes.c_int64(len(rows)))
        return out
    return store, load


def values() -> np.ndarray:
    """Rows over 14 decades (half-precision subnormals to past its range), the IEEE specials."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, D)) * 10.0 ** rng.uniform(-9, 5.5, (3000, 1))
    x[0, :10] = [1e6, -1e6, np.nan, np.inf, -np.inf, 65519.0, 65520.0, 2.0 ** -24, 2.0 ** -25, -0.0]
    x[1, :4] = [1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 2.0 ** -14 * (1 + 2.0 ** -11), 0.0]    # ties to even
    x[2] = 0.0                                                                       # a zero row (i8: scale 0)
    return x.astype(np.float32)


@pytest.mark.parametrize("storage", ["f16", "i8"])
@pytest.mark.parametrize("tier", ["ref", "avx2", "avx512"], indirect=True)
def test_native_rows_are_the_references_bits(tier, storage):
    x = values()
    if storage == "i8":
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)      # int8 rows scale by a finite absmax
    store, load = row_codec(tier, storage)
    rows = store(x)
    want = kv_quantize(x, storage)
    assert np.array_equal(rows.view(np.uint32), want.view(np.uint32)), \
        f"{int((rows.view(np.uint32) != want.view(np.uint32)).sum())} words differ"
    back, ref = load(rows), kv_dequantize(want, storage, D)
    same = (back == ref) | (np.isnan(back) & np.isnan(ref))
    assert same.all() and back.dtype == np.float32

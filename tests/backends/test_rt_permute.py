"""amxc::permute (backends/include/amxc_rt.h), the native transpose of permute nodes, against
numpy's transpose: every permutation of a rank-4 tensor (the last dim kept, copied as whole
runs, or moved, element by element), 1- and 8-byte elements, and an empty tensor."""
from __future__ import annotations

import ctypes
import itertools

import numpy as np
import pytest

from amxc.backends import toolchain

SOURCE = '''#include "amxc_rt.h"
extern "C" void entry(const uint8_t* in, uint8_t* out, int esize, int rank, const int64_t* shape,
                      const int* perm) { amxc::permute(in, out, esize, rank, shape, perm); }
'''


@pytest.fixture(scope="module")
def permute():
    return toolchain.load(toolchain.build(SOURCE, "ref", "test-permute")).entry


def run(permute, x: np.ndarray, perm) -> np.ndarray:
    out = np.empty(tuple(x.shape[p] for p in perm), x.dtype)
    shape = (ctypes.c_int64 * x.ndim)(*x.shape)
    order = (ctypes.c_int * x.ndim)(*perm)
    permute(ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data), x.itemsize, x.ndim, shape, order)
    return out


@pytest.mark.parametrize("perm", list(itertools.permutations(range(4))))
def test_every_rank4_permutation_equals_numpy(permute, perm):
    x = np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(2, 3, 5, 7)
    np.testing.assert_array_equal(run(permute, x, perm), x.transpose(perm))


def test_element_sizes_and_empty(permute):
    x = np.arange(4 * 6, dtype=np.int64).reshape(4, 6)
    np.testing.assert_array_equal(run(permute, x, (1, 0)), x.T)
    b = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    np.testing.assert_array_equal(run(permute, b, (1, 0, 2)), b.transpose(1, 0, 2))
    e = np.zeros((0, 3, 2), np.float32)
    assert run(permute, e, (2, 1, 0)).shape == (2, 3, 0)

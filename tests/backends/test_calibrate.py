"""The native GPTQ loops (backends/calibrate.py) against numpy's (passes/gptq.py).

The block-scale search computes in float64 like numpy's, so it picks the same scale code for
every block, except where two candidates' errors tie to the last bits (summation order):
there the chosen error must equal numpy's to 1e-12 relative.

Sweep tolerance: the native sweep carries each row's running weights in float32 where numpy's carries
float64 (GPTQ's own reference works in float32), so a value within ~1e-6 of an NF4 midpoint may
round the other way and move later columns slightly: codes must agree on >= 99.9 % of elements
and the layer's output error on the calibration inputs must match to 1 % (relative).
"""
from __future__ import annotations

import numpy as np
import pytest

from amxc.backends.calibrate import native_block_scales, native_gptq_sweep
from amxc.ir.formats import e4m3, nf4
from amxc.passes.gptq import block_scales_numpy, input_stats, output_error, quantize_gptq, sweep_numpy


def _problem(n, k, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.2 + np.eye(k)          # correlated inputs, uneven energy
    x = ((rng.standard_normal((2048, k)) @ mix) * np.linspace(0.2, 3.0, k)).astype(np.float32)
    w = rng.standard_normal((n, k)) * 0.05
    return w, input_stats(x)


@pytest.mark.parametrize("n,k", [(40, 256), (96, 512), (17, 128)])    # 17: a partial 16-row panel
def test_native_sweep_matches_numpy(n, k):
    w, stats = _problem(n, k)
    scale = np.abs(w.reshape(n, k // 64, 64)).max(axis=2).astype(np.float32)
    blocks = (stats.perm // 64).astype(np.int32)
    wp = np.ascontiguousarray(w[:, stats.perm])
    native, ref = native_gptq_sweep()(wp, stats.u, scale, blocks), sweep_numpy(wp, stats.u, scale, blocks)
    assert native.shape == ref.shape == (n, k) and native.dtype == np.uint8
    assert (native == ref).mean() >= 0.999
    # the sweep did compensate: its codes are not plain round-to-nearest of the weights
    rtn = nf4.nearest_code(np.clip(wp / np.repeat(scale, 64, axis=1)[:, stats.perm], -1, 1).astype(np.float32))
    assert (native != rtn).mean() > 0.05


def test_native_sweep_gives_the_same_layer_error_through_quantize_gptq():
    n, k = 64, 384
    w, stats = _problem(n, k, seed=1)
    layout = nf4.Layout((n, k), 64, "fp8_e4m3", 256)
    errs = [output_error(w, layout.dequantize(quantize_gptq(w, stats, layout, sweep=s, block_scales=b)), stats)
            for s, b in ((None, None), (native_gptq_sweep(), native_block_scales()))]
    rtn = output_error(w, layout.dequantize(nf4.quantize(w.astype(np.float32), layout)), stats)
    assert errs[1] == pytest.approx(errs[0], rel=0.01)
    assert errs[1] < 0.8 * rtn


def test_native_sweep_refuses_what_does_not_fit():
    sweep = native_gptq_sweep()
    w, u = np.zeros((4, 64)), np.eye(64)
    with pytest.raises(ValueError, match="do not agree"):
        sweep(w, np.eye(32), np.ones((4, 1), np.float32), np.zeros(64, np.int32))
    with pytest.raises(ValueError, match="refused"):            # a column's block out of range
        sweep(w, u, np.ones((4, 1), np.float32), np.full(64, 3, np.int32))


def _block_error(w, d, h):
    """Each block's h-weighted squared NF4 rounding error at decoded scales d [n, nb]."""
    n, k = w.shape
    wb, dd = w.reshape(n, k // 64, 64), d[..., None]
    inv = np.where(dd > 0, 1 / np.where(dd > 0, dd, 1), 0)
    codes = nf4.nearest_code(np.clip(wb * inv, -1, 1).astype(np.float32))
    return (((wb - nf4.TABLE.astype(np.float64)[codes] * dd) ** 2) * h.reshape(1, -1, 64)).sum(axis=2)


@pytest.mark.parametrize("search", [0, 3, 10])
def test_native_block_scales_pick_numpy_scales(search):
    rng = np.random.default_rng(search)
    n, k = 37, 640
    w = rng.standard_normal((n, k)) * np.exp(rng.standard_normal((n, 1)))   # rows of uneven size
    w[3, :64] = 0                                                            # an all-zero block
    h = np.exp(rng.standard_normal(k))
    absmax = np.abs(w.reshape(n, -1, 64)).max(axis=2).astype(np.float32)
    s2_row = np.repeat((absmax.max(axis=1) / np.float32(e4m3.MAX))[:, None], k // 64, axis=1).astype(np.float32)
    s2_row[5] = 0                                                            # a zero second-level scale
    (q_ref, d_ref), (q_nat, d_nat) = (f(w, s2_row, h, search) for f in (block_scales_numpy, native_block_scales()))
    assert q_nat.dtype == np.uint8 and q_nat.shape == d_nat.shape == (n, k // 64)
    same = q_nat == q_ref
    assert same.mean() >= 0.99
    np.testing.assert_array_equal(d_nat[same], d_ref[same])
    np.testing.assert_allclose(_block_error(w, d_nat, h), _block_error(w, d_ref, h), rtol=1e-12, atol=0)
    if search:                           # the search moved some scales below the absmax code
        assert (q_ref != e4m3.encode(np.where(s2_row > 0, absmax / np.where(s2_row > 0, s2_row, 1), 0))).any()


def test_native_block_scales_refuse_what_does_not_fit():
    with pytest.raises(ValueError, match="do not agree"):
        native_block_scales()(np.zeros((2, 64)), np.ones((2, 2), np.float32), np.ones(64), 3)

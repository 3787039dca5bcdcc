"""The native GPTQ column sweep (backends/calibrate.py) against numpy's (passes/gptq.sweep_numpy).

Tolerance: the native sweep carries each row's running weights in float32 where numpy's carries
float64 (GPTQ's own reference works in float32), so a value within ~1e-6 of an NF4 midpoint may
round the other way and move later columns slightly: codes must agree on >= 99.9 % of elements
and the layer's output error on the calibration inputs must match to 1 % (relative).
"""
from __future__ import annotations

import numpy as np
import pytest

from amxc.backends.calibrate import native_gptq_sweep
from amxc.ir.formats import nf4
from amxc.passes.gptq import input_stats, output_error, quantize_gptq, sweep_numpy


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
    errs = [output_error(w, layout.dequantize(quantize_gptq(w, stats, layout, sweep=s)), stats)
            for s in (None, native_gptq_sweep())]
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

"""The collectives' references (the lockstep interpreter's, and so the native ranks' oracle):
all_reduce adds the ranks' values in rank order in the input dtype, all_gather concatenates
along the last axis; both hand every rank the same result."""
from __future__ import annotations

import numpy as np
import pytest

import amxc.ir as ir
from amxc.ir.interpreter import run_ranks
from amxc.ir.registry import TypeInferenceError, get_op


def test_all_reduce_adds_in_rank_order_in_float32():
    rng = np.random.default_rng(0)
    xs = [(rng.standard_normal(1000) * 10.0 ** rng.integers(-3, 3)).astype(np.float32) for _ in range(4)]
    outs = get_op("all_reduce").reference(*xs, ways=4)
    want = ((xs[0] + xs[1]) + xs[2]) + xs[3]
    assert all(o.dtype == np.float32 and np.array_equal(o, want) for o in outs)
    other = (xs[0] + xs[1]) + (xs[2] + xs[3])                 # a tree order rounds differently
    assert not np.array_equal(want, other)


def test_all_gather_concatenates_the_last_axis():
    xs = [np.full((2, 3), r, np.float32) for r in range(3)]
    outs = get_op("all_gather").reference(*xs, ways=3)
    assert all(np.array_equal(o, np.concatenate(xs, axis=-1)) for o in outs)
    assert outs[0].shape == (2, 9)


def test_ways_must_match_and_be_at_least_two():
    with pytest.raises(ValueError, match="of 3 ways got 2 ranks"):
        get_op("all_reduce").reference(np.zeros(2), np.zeros(2), ways=3)
    with pytest.raises((TypeInferenceError, ir.VerifyError), match="ways >= 2"):
        ir.verify(ir.parse_module("""module @m {
  func @f(%x: f32[4]) -> (f32[4]) {
    %y = all_reduce(%x) {ways = 1} : f32[4]
    return %y
  }
}"""))


def test_a_sharded_module_runs_only_in_lockstep():
    m = ir.parse_module("""module @m attributes {tp = 2} {
  func @f(%x: f32[b, 4]) -> (f32[b, 8]) {
    %y = all_reduce(%x) {ways = 2} : f32[b, 4]
    %z = all_gather(%y) {ways = 2} : f32[b, 8]
    return %z
  }
}""")
    x0, x1 = np.ones((1, 4), np.float32), np.full((1, 4), 2, np.float32)
    with pytest.raises(ir.InterpreterError, match="run_ranks"):
        ir.run(m, [x0])
    (r0,), (r1,) = run_ranks(m, [[x0], [x1]])
    assert np.array_equal(r0, np.full((1, 8), 3, np.float32)) and np.array_equal(r0, r1)


def test_embedding_parts_add_up_to_the_whole_lookup_exactly():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((12, 5)).astype(np.float32)
    ids = np.array([[0, 5, 6, 11, 3]], np.int64)
    part = get_op("embedding_part").reference
    halves = [part(table[r * 6:(r + 1) * 6], ids, np.array([r * 6], np.int64)) for r in range(2)]
    assert np.array_equal(halves[0][0, 2], np.zeros(5, np.float32))       # id 6 is the other rank's
    total = get_op("all_reduce").reference(*halves, ways=2)[0]
    assert np.array_equal(total, table[ids])                             # x + 0: no rounding

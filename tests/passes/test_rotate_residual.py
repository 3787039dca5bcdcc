"""rotate-residual: a random orthogonal change of basis of the residual stream, folded into the
weights.  The float model's function must not change (only fp32 rounding: Q is applied in float64
and every weight rounded once to float32, so logits move by ~1e-6 of their range; bound 1e-5);
what cannot be proven unchanged is left alone with the reason.  The golden file
(golden/rotate-residual.ir) pins the rewrite's shape and checks a toy block through the
interpreter; these tests run it on a real checkpoint's graph."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from amxc.api import optimize, trace
from amxc.ir import parse_module
from amxc.ir.interpreter import run
from amxc.passes import PassError
from amxc.passes.quantize_nf4 import QuantizeNF4
from amxc.passes.rotate_residual import RotateResidual, _rows_times, block_hadamard, orthogonal

GRAPH = "canonicalize,fold-constants,cse,dce,fuse-rms-norm,fuse-rope,fuse-attention,fuse-swiglu,dce"


def _logits(module, ids):
    return run(module, {"input_ids": ids, "position_ids": np.arange(ids.shape[1])[None]})[0]


@pytest.fixture(scope="module")
def stories_graph(stories_dir):
    def fresh():
        module = trace(stories_dir)
        optimize(module, GRAPH)
        return module
    return fresh


def test_rotation_keeps_a_real_models_function(stories_graph):
    module = stories_graph()
    ids = np.random.default_rng(0).integers(0, 512, (1, 48))
    before = _logits(module, ids)
    norms = [n.inputs[1].name for n in module.main.nodes if n.op == "rms_norm"]
    p = RotateResidual(seed=3)
    assert p.run(module) and p.skipped == ""
    after = _logits(module, ids)
    rel = float(np.abs(after - before).max() / np.abs(before).max())
    print(f"stories260K logits after rotation: max rel change {rel:.2e}")
    assert rel < 1e-5
    # every norm (5 layers x 2, and the final one) now scales by 1: its scale is in the weights
    assert len(norms) == 11 and all(np.all(module.params[n].load() == 1) for n in norms)


def test_rotation_moves_the_stream_out_of_its_basis(stories_graph):
    """Not the identity: the embedding rows change, and their norms do not (Q is orthogonal)."""
    module = stories_graph()
    table = next(n for n in module.main.nodes if n.op == "embedding").inputs[0]
    e0 = table.load().copy()
    RotateResidual().run(module)
    e1 = next(n for n in module.main.nodes if n.op == "embedding").inputs[0].load()
    assert np.abs(e1 - e0).max() > 0.1 * np.abs(e0).max()
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), np.linalg.norm(e0, axis=1), rtol=1e-5)


@pytest.mark.parametrize("make", [lambda: orthogonal(96, 1), lambda: block_hadamard(96, 32, 1)],
                         ids=["dense", "hadamard-blocks"])
def test_rotations_are_orthogonal_and_seeded(make):
    q = make()
    np.testing.assert_allclose(q @ q.T, np.eye(96), atol=1e-12)
    np.testing.assert_array_equal(q, make())


def test_seeds_differ_and_bad_blocks_are_named():
    assert np.abs(orthogonal(16, 0) - orthogonal(16, 1)).max() > 0.1
    with pytest.raises(PassError, match="block=24 is not a power of two dividing 96"):
        block_hadamard(96, 24, 0)


SCALED = """module @m {
  param @emb : f32[16, 8]
  param @n1 : f32[8]
  param @wq : f32[8, 8]
  func @forward(%ids: i64[b, s]) -> (f32[b, s, 8]) {
    %e = embedding(@emb, %ids) : f32[b, s, 8]
    %k = constant() {value = 2.0, dtype = f32} : f32[]
    %h = mul(%e, %k) : f32[b, s, 8]
    %x = rms_norm(%h, @n1) {eps = 1e-05} : f32[b, s, 8]
    %q = linear(%x, @wq) : f32[b, s, 8]
    return %q
  }
}"""


def test_what_cannot_be_rotated_is_left_with_its_reason():
    module = parse_module(SCALED)
    p = RotateResidual()
    assert p.run(module) is False
    assert p.skipped == "@forward: the residual stream (%e) is read by %h = mul"


SHARED_READER = """module @m {
  param @emb : f32[16, 8]
  param @n1 : f32[8]
  param @n2 : f32[8]
  param @wq : f32[8, 8]
  param @wo : f32[8, 8]
  func @forward(%ids: i64[b, s]) -> (f32[b, s, 8]) {
    %h = embedding(@emb, %ids) : f32[b, s, 8]
    %x1 = rms_norm(%h, @n1) {eps = 1e-05} : f32[b, s, 8]
    %a = linear(%x1, @wq) : f32[b, s, 8]
    %o = linear(%a, @wo) : f32[b, s, 8]
    %h1 = add(%h, %o) : f32[b, s, 8]
    %x2 = rms_norm(%h1, @n2) {eps = 1e-05} : f32[b, s, 8]
    %y = linear(%x2, @wq) : f32[b, s, 8]
    return %y
  }
}"""


def test_a_weight_behind_two_norms_is_left_alone():
    """Layers sharing a weight (ALBERT-style) but not their norms: one matrix cannot absorb two
    scales."""
    p = RotateResidual()
    assert p.run(parse_module(SHARED_READER)) is False
    assert "@wq reads the outputs of two norms" in p.skipped


def test_a_sharded_module_is_refused(stories_graph):
    module = stories_graph()
    module.attrs["tp"] = 2
    with pytest.raises(PassError, match="already sharded.*rotate before shard-tp"):
        RotateResidual().run(module)


def test_quantize_nf4_rotate_option_reports_what_it_did(stories_graph):
    module = stories_graph()
    q = QuantizeNF4(method="rtn", rotate=True)
    q.run(module)
    assert q.rotation == "" and any(n.endswith(".rotated_table") for n in module.params)
    q = QuantizeNF4(method="rtn", rotate=True)
    q.run(parse_module(SCALED))              # nothing to quantize there (8 inputs): only the reason
    assert "read by %h = mul" in q.rotation


def test_a_large_table_is_rotated_in_pieces_with_float64_products():
    """A 49,152-row head rotated in one float64 piece held ~5x its float32 size in temporaries
    (SmolLM2's rotate=true compile peaked at 0.96 GB; 0.42 GB in pieces); in pieces the
    temporaries are a piece's.  The result is the one-piece float64 product rounded once, for any row count."""
    rng = np.random.default_rng(1)
    q, g = orthogonal(128, 0), rng.uniform(0.5, 2.0, 128)
    a = rng.standard_normal((10_001, 128)).astype(np.float32)          # not a multiple of a piece
    whole = ((a.astype(np.float64) * g) @ q).astype(np.float32)
    np.testing.assert_allclose(_rows_times(a, q, g, rows=4096), whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_rows_times(a, q, rows=1000), _rows_times(a, q, rows=3000), rtol=0, atol=1e-6)
    big = rng.standard_normal((40_000, 128)).astype(np.float32)       # 20 MB
    tracemalloc.start()
    _rows_times(big, q, g)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.6 * big.nbytes, f"peak {peak / 1e6:.0f} MB for a {big.nbytes / 1e6:.0f} MB table"

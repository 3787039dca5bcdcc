"""Every op's numpy reference against torch (the semantics the frontend maps from), plus type
inference that rejects what it must.  Tolerances: 1e-6 relative for fp32 elementwise math
(one rounding apart), exact for integer, boolean and layout ops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import amxc.ir as ir
from amxc.ir import dtypes as T
from amxc.ir.types import TensorType

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 3, 8)).astype(np.float32)
Y = rng.standard_normal((2, 3, 8)).astype(np.float32)
P = np.abs(X) + 0.1
I = rng.integers(0, 5, (2, 3, 8))

NANS = np.array([[1.0, np.nan, -2.0, np.inf]], np.float32)
LF_H, LF_X = 8, rng.standard_normal((2, 6, 8)).astype(np.float32)
LF_W = [rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((4, 16), (4,), (8, 8), (8,))] + \
    [(1 + 0.1 * rng.standard_normal(8)).astype(np.float32)]


def _torch_lf(x, w1, b1, w2, b2, weight):
    """Yuan's LF as the published code computes it: Conv2d over [B, C, T, 1], padding 1, first T."""
    def conv(v, w, b):             # w [out, 2*in] = taps (previous, current) -> Conv2d [out, in, 2, 1]
        k = torch.stack([w[:, :w.shape[1] // 2], w[:, w.shape[1] // 2:]], dim=2)[..., None]
        out = torch.nn.functional.conv2d(v.transpose(1, 2)[..., None], k, b, padding=(1, 0))
        return out[:, :, :v.shape[1], 0].transpose(1, 2)
    y = conv(conv(x, w1, b1), w2, b2) + x
    return weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6))


CASES = [  # (op, inputs, attrs, torch reference)
    ("isnan", [NANS], {}, torch.isnan),
    ("localized_filter", [LF_X, *LF_W], {"eps": 1e-6}, _torch_lf),
    ("add", [X, Y], {}, lambda a, b: a + b),
    ("sub", [X, Y], {}, lambda a, b: a - b),
    ("mul", [X, Y[:, :1]], {}, lambda a, b: a * b),
    ("div", [X, P], {}, lambda a, b: a / b),
    ("pow", [P, np.float32(2.0)], {}, lambda a, b: a ** b),
    ("maximum", [X, Y], {}, torch.maximum),
    ("eq", [I, I[:, :, :1]], {}, torch.eq),
    ("le", [X, Y], {}, torch.le),
    ("where", [X > 0, X, Y], {}, torch.where),
    ("exp", [X], {}, torch.exp), ("log", [P], {}, torch.log), ("rsqrt", [P], {}, torch.rsqrt),
    ("sin", [X], {}, torch.sin), ("cos", [X], {}, torch.cos), ("tanh", [X], {}, torch.tanh),
    ("sigmoid", [X], {}, torch.sigmoid), ("silu", [X], {}, torch.nn.functional.silu),
    ("relu", [X], {}, torch.relu), ("neg", [X], {}, torch.neg),
    ("gelu", [X], {}, torch.nn.functional.gelu),
    ("gelu", [X], {"approximate": "tanh"}, lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    ("cast", [X], {"dtype": T.i64}, lambda x: x.to(torch.int64)),
    ("mean", [X], {"axes": [-1], "keepdim": True}, lambda x: x.mean(-1, keepdim=True)),
    ("sum", [X], {"axes": [0, 2]}, lambda x: x.sum((0, 2))),
    ("max", [X], {"axes": [1]}, lambda x: x.amax(1)),
    ("cumsum", [I], {"axis": -1}, lambda x: x.cumsum(-1)),
    ("diff", [I, I[:, :, :1]], {"axis": -1}, lambda x, p: torch.diff(x, dim=-1, prepend=p)),
    ("softmax", [X], {"axis": -1}, lambda x: torch.softmax(x, -1)),
    ("permute", [X], {"perm": [2, 0, 1]}, lambda x: x.permute(2, 0, 1)),
    ("reshape", [X], {"shape": [6, 8]}, lambda x: x.reshape(6, 8)),
    ("expand", [X[:, :1]], {"shape": [2, 3, 8]}, lambda x: x.expand(2, 3, 8)),
    ("slice", [X], {"axis": 2, "start": 1, "end": 7, "step": 2}, lambda x: x[:, :, 1:7:2]),
    ("concat", [X, Y], {"axis": 1}, lambda a, b: torch.cat([a, b], 1)),
    ("index", [X, np.array([[1], [0]]), np.array([[2, 0]])], {"axes": [0, 1]},
     lambda x, i, j: x[i, j]),
    ("index", [X, np.array([1, 0]), np.array([3, 4])], {"axes": [0, 2]}, lambda x, i, j: x[i, :, j]),
    ("linear", [X, Y[0], Y[1, :, 0]], {}, torch.nn.functional.linear),
    ("matmul", [X, Y.transpose(0, 2, 1)], {}, torch.matmul),
    ("embedding", [Y[0], np.array([[2, 0, 1]])], {}, lambda w, i: torch.nn.functional.embedding(i, w)),
    ("layer_norm", [X, Y[0, 0], Y[1, 0]], {"eps": 1e-5},
     lambda x, w, b: torch.nn.functional.layer_norm(x, (8,), w, b, 1e-5)),
    ("minimum", [X, Y], {}, torch.minimum), ("abs", [X], {}, torch.abs),
    ("sqrt", [P], {}, torch.sqrt), ("reciprocal", [P], {}, torch.reciprocal),
    ("ne", [I, I[:1]], {}, torch.ne), ("lt", [X, Y], {}, torch.lt), ("gt", [X, Y], {}, torch.gt),
    ("ge", [I, I[:, :1]], {}, torch.ge),
    ("logical_and", [X > 0, Y > 0], {}, torch.logical_and),
    ("logical_or", [X > 0, Y > 0], {}, torch.logical_or), ("logical_not", [X > 0], {}, torch.logical_not),
    ("split", [X], {"axis": 2, "sizes": [3, 5]}, lambda x: x.split([3, 5], 2)[1]),
    ("constant", [], {"value": 2.5, "dtype": T.f32}, lambda: torch.tensor(2.5)),
    ("arange", [], {"start": 2, "end": 9, "step": 3, "dtype": T.i64}, lambda: torch.arange(2, 9, 3)),
    ("full", [], {"shape": [2, 3], "value": True, "dtype": T.bool_}, lambda: torch.full((2, 3), True)),
    # fused ops, each against torch's own formulation
    ("rms_norm", [X, Y[0, 0]], {"eps": 1e-5},
     lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))),
    ("rope", [X, np.cos(Y), np.sin(Y)], {},
     lambda x, c, s: x * c + torch.cat([-x[..., 4:], x[..., :4]], -1) * s),
    ("rope", [X, np.repeat(np.cos(Y[..., :4]), 2, -1), np.repeat(np.sin(Y[..., :4]), 2, -1)],
     {"interleaved": True}, lambda x, c, s: _complex_rotation(x, c[..., ::2], s[..., ::2])),
    ("mlp_swiglu", [X, Y.reshape(6, 8), Y.reshape(6, 8)[::-1].copy(), Y.reshape(8, 6)],
     {}, lambda x, g, u, d: torch.nn.functional.linear(
         torch.nn.functional.silu(x @ g.T) * (x @ u.T), d)),
    ("mlp_gelu", [X, Y.reshape(6, 8), Y.reshape(8, 6), Y[0, 0, :6].copy(), Y[1, 1].copy()],
     {"approximate": "tanh"}, lambda x, w1, w2, b1, b2: torch.nn.functional.linear(
         torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1), approximate="tanh"), w2, b2)),
]


def _complex_rotation(x, cos, sin):
    """Interleaved RoPE as llama.cpp/Meta write it: pairs as complex numbers times e^(i theta)."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).double().contiguous())
    rotated = torch.view_as_real(pairs * torch.complex(cos.double(), sin.double()))
    return rotated.reshape(x.shape).float()


def _torch(a):
    return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else torch.tensor(a)


def _run_single(op, inputs, attrs):
    """Build a one-node module around `op`, verify it, and run the interpreter."""
    fn = ir.Function("f", [ir.Value(f"x{i}", TensorType(T.from_numpy(a.dtype), a.shape))
                           for i, a in enumerate(inputs)])
    m = ir.Module("t")
    m.add_function(fn)
    out = ir.Builder(fn).emit(op, fn.args, attrs)
    fn.results = [out] if isinstance(out, ir.Value) else list(out)
    ir.verify(m)
    return ir.run(m, [np.asarray(a) for a in inputs])


@pytest.mark.parametrize("op, inputs, attrs, ref", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_reference_matches_torch(op, inputs, attrs, ref):
    ours = _run_single(op, inputs, attrs)[-1]
    want = ref(*(_torch(a) for a in inputs)).numpy()
    assert ours.shape == want.shape and ours.dtype == want.dtype
    if ours.dtype.kind == "f":
        np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(ours, want)


@pytest.mark.parametrize("causal, gqa, mask", [(False, False, None), (True, False, None),
                                               (False, True, "bool"), (True, True, "float")])
def test_sdpa_matches_torch(causal, gqa, mask):
    q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2 if gqa else 4, 5, 8)).astype(np.float32)
    v = rng.standard_normal(k.shape).astype(np.float32)
    inputs = [q, k, v]
    if mask == "bool":
        inputs.append((rng.random((2, 1, 5, 5)) > 0.3) | np.eye(5, dtype=bool))
    elif mask == "float":
        inputs.append(rng.standard_normal((1, 1, 5, 5)).astype(np.float32))
    ours = _run_single("sdpa", inputs, {"causal": causal, "gqa": gqa, "scale": 0.3})[0]
    t = [_torch(a) for a in inputs]
    want = torch.nn.functional.scaled_dot_product_attention(
        t[0], t[1], t[2], attn_mask=t[3] if mask else None, is_causal=causal, scale=0.3,
        enable_gqa=gqa).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [0, 3])
def test_attention_matches_torch_with_position_masks(window):
    from amxc.ir.ops.cache import DenseKVCache
    from amxc.ir.types import KVCacheType
    b, hq, hk, s, d = 2, 4, 2, 7, 8
    q = rng.standard_normal((b, hq, s, d)).astype(np.float32)
    k = rng.standard_normal((b, hk, s, d)).astype(np.float32)
    v = rng.standard_normal((b, hk, s, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(s), (b, s)).copy()
    ours = _run_single("attention", [q, k, v, pos], {"scale": 0.3, "window": window})[0]
    i, j = np.arange(s)[:, None], np.arange(s)[None]
    mask = (j <= i) & ((i - j < window) if window else True)
    want = torch.nn.functional.scaled_dot_product_attention(
        *map(_torch, (q, k, v)), attn_mask=_torch(mask), scale=0.3, enable_gqa=True).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)
    # the cached form over a prefill of the same tokens computes the same thing
    cache = DenseKVCache(KVCacheType(1, hk, d, T.f32), b, capacity=16)
    cached = ir.get_op("attention_cached").reference(q, k, v, pos, cache, layer=0, scale=0.3,
                                                       window=window)
    np.testing.assert_allclose(cached, ours, rtol=0, atol=0)


@pytest.mark.parametrize("op, types, attrs, message", [
    ("add", ["f32[2, 3]", "f32[4]"], {}, "do not broadcast"),
    ("add", ["f32[2]", "i64[2]"], {}, "share one dtype"),
    ("linear", ["f32[b, 8]", "f32[4, 7]"], {}, "does not match weight"),
    ("reshape", ["f32[2, 3]"], {"shape": [4, 2]}, "cannot reshape"),
    ("permute", ["f32[2, 3]"], {"perm": [0, 0]}, "not a permutation"),
    ("sdpa", ["f32[1, 6, 4, 8]", "f32[1, 4, 4, 8]", "f32[1, 4, 4, 8]"], {"gqa": True}, "divisibility"),
    ("split", ["f32[6]"], {"axis": 0, "sizes": [2, 3]}, "do not add up"),
])
def test_type_inference_rejects(op, types, attrs, message):
    def parse_type(t):
        m = ir.parse_module(f"module @m {{ func @f(%x: {t}) -> () {{ return }} }}")
        return m.main.args[0].type
    opdef = ir.get_op(op)
    with pytest.raises(ir.TypeInferenceError, match=message):
        opdef.infer([parse_type(t) for t in types], opdef.normalize_attrs(attrs))


def test_interpreter_checks_declared_shapes():
    m = ir.parse_module("module @m { func @f(%x: f32[n]) -> (f32[n]) {\n"
                        "  %y = reshape(%x) {shape = [n]} : f32[n]\n  return %y\n} }")
    m.main.nodes[0].outputs[0].type = TensorType(T.f32, (3,))   # lie about the result
    with pytest.raises(ir.InterpreterError, match="declared"):
        ir.run(m, [np.zeros(4, np.float32)])


def test_every_registered_op_is_tested():
    # attention ops have their own tests below; linear_nf4 and linear_q8 are checked in
    # test_nf4.py and test_q8.py, the
    # collectives (references over all ranks' inputs) in test_collective.py
    untested = set(ir.all_ops()) - {c[0] for c in CASES} - {"sdpa", "attention", "attention_cached", "linear_nf4", "linear_q8",
                                                            "all_reduce", "all_gather", "embedding_part",
                                                            "lf_state", "lf_pairs"}   # test_lf_over_the_cache
    assert not untested, f"ops without a torch comparison: {sorted(untested)}"


def test_lf_over_the_cache_equals_the_whole_sequence():
    """lf_state -> lf_pairs -> linear -> lf_pairs -> linear -> add -> rms_norm, run chunk by
    chunk over a cache's state slot (what the kv-cache pass emits), == localized_filter on the
    whole sequence: the inputs before each chunk come back from the cache, zeros before 0."""
    from amxc.ir.ops.cache import DenseKVCache
    from amxc.ir.types import KVCacheType

    get = lambda name: ir.get_op(name).reference        # noqa: E731
    w1, b1, w2, b2, weight = LF_W
    whole = get("localized_filter")(LF_X, *LF_W, eps=1e-6)
    cache = DenseKVCache(KVCacheType(1, 2, 4, T.f32, state=1), batch=2, capacity=16)
    out = []
    for c0, c1 in ((0, 1), (1, 4), (4, 5), (5, 6)):
        x, pos = LF_X[:, c0:c1], np.broadcast_to(np.arange(c0, c1), (2, c1 - c0)).astype(np.int64)
        hist = get("lf_state")(x, pos, cache, slot=0, slots=1)
        o1 = get("linear")(get("lf_pairs")(hist, pos, offset=2), w1, b1)
        o2 = get("linear")(get("lf_pairs")(o1, pos, offset=1), w2, b2)
        out.append(get("rms_norm")(o2 + x, weight, 1e-6))
    np.testing.assert_allclose(np.concatenate(out, axis=1), whole, rtol=1e-5, atol=1e-5)


def test_streams_run_in_lockstep_and_observe_may_replace_one_stream():
    """run_streams (GPTQ's float and quantized models side by side): each stream equals its own
    run, and a replacement the observer makes reaches only its stream."""
    from amxc.ir.interpreter import Computed, run, run_streams
    m = ir.parse_module("""module @m {
  param @w : f32[4, 3]
  func @main(%x: f32[2, 3]) -> (f32[2, 4]) {
    %y = linear(%x, @w) : f32[2, 4]
    %z = relu(%y) : f32[2, 4]
    return %z
  }
}""")
    rng = np.random.default_rng(0)
    m.params["w"].set_data(rng.standard_normal((4, 3)).astype(np.float32))
    a, b = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(2))
    (ra,), (rb,) = run_streams(m, [[a], [b]])
    assert np.array_equal(ra, run(m, [a])[0]) and np.array_equal(rb, run(m, [b])[0])
    seen = []

    def zero_second_weight(node, streams):
        seen.append((node.op, len(streams)))
        if node.op == "linear":
            return [streams[0], [streams[1][0], np.zeros_like(streams[1][1])]]
    (ra2,), (rb2,) = run_streams(m, [[a], [a]], observe=zero_second_weight)
    assert seen == [("linear", 2), ("relu", 2)]
    assert np.array_equal(ra2, run(m, [a])[0]) and not rb2.any()

    def give_results(node, streams):      # Computed: the observer supplies the node's results
        if node.op == "linear":
            return Computed([np.full((2, 4), -1.0, np.float32), np.full((2, 4), 2.0, np.float32)])
    (ra3,), (rb3,) = run_streams(m, [[a], [b]], observe=give_results)
    assert not ra3.any() and (rb3 == 2).all()          # relu of what was given, per stream


def test_one_layer_cache_attends_as_the_dense_cache():
    """The calibration cache holds only the layer being run: a prefill through it gives the
    dense cache's bits, layer after layer, and it refuses to read a layer it no longer holds."""
    from amxc.ir.ops.cache import DenseKVCache, OneLayerKVCache
    from amxc.ir.types import KVCacheType
    b, hq, hk, s, d = 2, 4, 2, 7, 8
    kv = KVCacheType(3, hk, d, T.f32)
    dense, one = DenseKVCache(kv, b, capacity=8), OneLayerKVCache(kv, b, capacity=8)
    assert one.k.nbytes * 3 == dense.k.nbytes
    pos = np.broadcast_to(np.arange(s), (b, s)).copy()
    attend = ir.get_op("attention_cached").reference
    for layer in range(3):
        q = rng.standard_normal((b, hq, s, d)).astype(np.float32)
        k, v = (rng.standard_normal((b, hk, s, d)).astype(np.float32) for _ in range(2))
        want = attend(q, k, v, pos, dense, layer=layer, scale=0.3, window=0)
        assert np.array_equal(attend(q, k, v, pos, one, layer=layer, scale=0.3, window=0), want)
    with pytest.raises(IndexError, match="holds layer 2's keys, not layer 0's"):
        one.read(0, s)


def test_attention_in_batch_slices_changes_no_bit(monkeypatch):
    """A large batch attends in slices of rows (memory of a calibration run); each row is
    computed alone either way."""
    from amxc.ir.ops import fused
    rng = np.random.default_rng(0)
    b, h, kv, s, d = 7, 4, 2, 9, 8
    q, k, v = (rng.standard_normal((b, hh, s, d)).astype(np.float32) for hh in (h, kv, kv))
    pos = np.broadcast_to(np.arange(s), (b, s)).copy()
    whole = fused.attention(q, k, v, pos, scale=0.3, causal=True, window=0)
    monkeypatch.setattr(fused, "ATTEND_SLICE_ELEMENTS", 2 * h * s * s)      # two rows a slice
    sliced = fused.attention(q, k, v, pos, scale=0.3, causal=True, window=0)
    assert np.array_equal(whole, sliced)


def test_attention_query_blocks_cut_only_keys_no_query_sees(monkeypatch):
    """Queries attend in blocks, each over the keys up to the last one its mask shows; with a
    sliding window, padding and a query that sees no key, blocks of 3 agree with one block of
    all queries (float64: only the lengths of runs of exact zeros differ)."""
    from amxc.ir.ops import fused
    rng = np.random.default_rng(1)
    b, h, kv, s, d = 3, 6, 2, 11, 8
    q, k, v = (rng.standard_normal((b, hh, s, d)) for hh in (h, kv, kv))
    pos = np.broadcast_to(np.arange(s), (b, s)).copy()
    valid = np.ones((b, s), bool)
    valid[1, :4] = False                                   # row 1's first query sees no key
    whole = fused.attention(q, k, v, pos, valid, scale=0.3, causal=True, window=5)
    monkeypatch.setattr(fused, "ATTEND_QUERY_BLOCK", 3)
    blocked = fused.attention(q, k, v, pos, valid, scale=0.3, causal=True, window=5)
    np.testing.assert_allclose(blocked, whole, rtol=1e-13, atol=1e-15)
    assert np.all(blocked[1, :, 0] == 0)
    ref = fused.masked_softmax(np.einsum("bhqd,bhkd->bhqk", q, np.repeat(k, 3, axis=1)) * 0.3,
                               fused.position_mask(pos, pos, True, 5) & valid[:, None, None, :])
    np.testing.assert_allclose(blocked, ref @ np.repeat(v, 3, axis=1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu_in_place_gives_the_expressions_bits(dtype):
    """The SwiGLU reference's in-place silu (no temporaries of the MLP's width in calibration)
    must be g / (1 + exp(-g)) to the bit: a reordering such as g * (1 / (1 + exp(-g))) would
    move the calibrated weights.  Oracle: the expression, evaluated by numpy as written."""
    from amxc.ir.ops.fused import SILU_BLOCK, silu_in_place
    rng = np.random.default_rng(2)
    # one block; several blocks and a short last one; a strided view (no flat view of its buffer)
    for shape, view in (((64, 96), False), ((3, SILU_BLOCK // 2 + 7), False), ((40, 64), True)):
        g = (rng.standard_normal(shape) * 12).astype(dtype)
        buf = g.copy()
        if view:
            g, buf = g[:, ::2], buf[:, ::2]
        want = g / (1.0 + np.exp(-g))
        got = silu_in_place(buf)
        assert got is buf and got.dtype == dtype
        assert np.array_equal(np.ascontiguousarray(got).view(np.uint8), want.view(np.uint8)), shape

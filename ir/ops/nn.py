"""Neural-network ops: linear algebra, embedding, normalization, attention.

Products and attention accumulate in float64 and round once to the output dtype: the reference
is then at least as accurate as any fp32 kernel it judges, and its own error (one rounding) is
far below every tolerance used against it.  `accumulate_in(np.float32)` lowers that for a block
of code (GPTQ calibration: statistics, not an oracle, and 2-3x faster in float32 BLAS), and may
hand linear's products to another float32-accumulating GEMM (quantize-nf4{products=bf16}: bf16
inputs; amxc.api supplies the native one, since ir imports nothing of ours)."""
from __future__ import annotations

import contextlib
import math

import numpy as np

from ..attrs import Attr
from ..dtypes import bool_, i32, i64
from ..registry import register_op
from ..types import TensorType
from ._shapes import broadcast_shapes, fail, same_dtype


#: the accumulation dtype of linear, matmul and attention, and the GEMM that float32 products
#: go to (None: numpy's) (module state: the interpreter runs in one thread; only calibration
#: changes it, through accumulate_in)
ACCUMULATE = {"dtype": np.float64, "gemm": None}


@contextlib.contextmanager
def accumulate_in(dtype, gemm=None):
    """Products and attention accumulate in `dtype` inside the block; with float32, `gemm(a, b)`
    (2-D float32 a [m, k] and b [k, n], either possibly a transposed view; float32 a @ b out)
    computes linear's products and calibration's `product`s."""
    old = dict(ACCUMULATE)
    ACCUMULATE.update(dtype=dtype, gemm=gemm if dtype == np.float32 else None)
    try:
        yield
    finally:
        ACCUMULATE.update(old)


def product(a: np.ndarray, b: np.ndarray, dtype=None) -> np.ndarray:
    """a @ b of 2-D arrays in `dtype` (default: the accumulation dtype), through accumulate_in's
    gemm when one is set and the dtype is float32."""
    gemm, acc = ACCUMULATE["gemm"], dtype or ACCUMULATE["dtype"]
    if gemm is not None and acc == np.float32:
        return gemm(a.astype(acc, copy=False), b.astype(acc, copy=False))
    return np.matmul(a.astype(acc, copy=False), b.astype(acc, copy=False))


def _linear_infer(ts, at):
    x, w = ts[0], ts[1]
    same_dtype(ts)
    if w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[1]:
        fail(f"linear: x {x} does not match weight [out, in] {w}")
    if len(ts) == 3 and ts[2].shape != (w.shape[0],):
        fail(f"linear: bias {ts[2]} does not match {w.shape[0]} outputs")
    return [x.with_shape(x.shape[:-1] + (w.shape[0],))]


@register_op("linear", "x weight bias?", infer=_linear_infer, weights=(1,), nf4_variant="linear_nf4",
             q8_variant="linear_q8", native="linear")
def linear(x, weight, bias=None):
    """x @ weight.T (+ bias), weight stored [out_features, in_features] as in torch."""
    # as one 2-D product: numpy runs [b, s, K] @ [K, N] as b GEMMs of s rows, which took 10-25 %
    # longer at a calibration run's 32 x 512 rows (SmolLM2's gate, Zen 3)
    y = product(x.reshape(-1, x.shape[-1]), weight.T).reshape(x.shape[:-1] + (weight.shape[0],))
    return (y if bias is None else y + bias).astype(x.dtype, copy=False)


def _matmul_infer(ts, at):
    a, b = ts
    same_dtype(ts)
    if a.rank < 2 or b.rank < 2 or a.shape[-1] != b.shape[-2]:
        fail(f"matmul: {a} @ {b} do not conform")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return [a.with_shape(batch + (a.shape[-2], b.shape[-1]))]


@register_op("matmul", "a b", infer=_matmul_infer)
def matmul(a, b):
    return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)


def _embedding_infer(ts, at):
    w, ids = ts
    if w.rank != 2 or ids.dtype not in (i64, i32):
        fail(f"embedding needs a [vocab, dim] table and integer ids, got {w} and {ids}")
    return [w.with_shape(ids.shape + (w.shape[1],))]


@register_op("embedding", "weight ids", infer=_embedding_infer, native="kernel")
def embedding(weight, ids):
    return weight[ids]


def _layer_norm_infer(ts, at):
    x = ts[0]
    n = at["axes"]
    same_dtype(ts)
    for p in ts[1:]:
        if p.shape != x.shape[x.rank - n:]:
            fail(f"layer_norm affine {p} does not match normalized dims of {x}")
    return [x]


@register_op("layer_norm", "x weight? bias?", {"axes": Attr("int", 1), "eps": Attr("float", 1e-5)},
             infer=_layer_norm_infer, kind="norm", native="kernel")
def layer_norm(x, weight=None, bias=None, *, axes, eps):
    """Normalizes over the last `axes` dims (torch.nn.functional.layer_norm)."""
    dims = tuple(range(x.ndim - axes, x.ndim))
    mu = x.mean(axis=dims, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=dims, keepdims=True)
    y = (x - mu) / np.sqrt(var + np.float32(eps))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def _sdpa_infer(ts, at):
    q, k, v = ts[:3]
    same_dtype(ts[:3])
    if not (q.rank == k.rank == v.rank >= 3):
        fail("sdpa needs q, k, v of one rank >= 3")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        fail(f"sdpa: q {q}, k {k}, v {v} do not conform")
    hq, hk = q.shape[-3], k.shape[-3]
    if hq != hk and not (at["gqa"] and isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
        fail(f"sdpa: {hq} query heads vs {hk} kv heads needs gqa=true and divisibility")
    if len(ts) == 4:
        m = ts[3]
        if m.dtype != bool_ and m.dtype != q.dtype:
            fail("sdpa mask must be bool or the query's dtype")
        broadcast_shapes(m.shape, q.shape[:-1] + (k.shape[-2],))
    return [q.with_shape(q.shape[:-1] + (v.shape[-1],))]


@register_op("sdpa", "q k v mask?", {"causal": Attr("bool", False), "scale": Attr("float", None),
                                     "gqa": Attr("bool", False)}, infer=_sdpa_infer)
def sdpa(q, k, v, mask=None, *, causal, scale, gqa):
    """Scaled dot-product attention with torch's semantics: a bool mask marks the keys a query
    may attend to, a float mask is added to the scores; causal aligns the diagonal top-left."""
    if gqa and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = np.repeat(k, rep, axis=-3), np.repeat(v, rep, axis=-3)
    dtype = q.dtype
    q, k, v = (t.astype(np.float64) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    L, S = q.shape[-2], k.shape[-2]
    if causal:
        scores = np.where(np.tril(np.ones((L, S), dtype=bool)), scores, -np.inf)
    visible = True
    if mask is not None:
        if mask.dtype == np.bool_:
            visible = mask
        else:
            scores = scores + mask
    from .fused import masked_softmax     # local: fused imports this module
    return np.matmul(masked_softmax(scores, np.broadcast_to(visible, scores.shape)), v).astype(dtype)

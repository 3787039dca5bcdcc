"""Fused ops produced by the fusion passes: the units kernels are written for.

Each reference is written as the unfused composition it replaces, so a fusion is exact up to
float rounding by construction, and the golden tests check it numerically too."""
from __future__ import annotations

import numpy as np

from ..attrs import Attr
from ..dtypes import bool_, i64
from ..registry import register_op
from ._shapes import broadcast_shapes, fail, same_dtype
from .elementwise import gelu
from .nn import ACCUMULATE, linear
from .quant import check_weight, weight_value


def _rms_norm_infer(ts, at):
    x, w = ts
    same_dtype(ts)
    if w.shape != x.shape[-1:]:
        fail(f"rms_norm weight {w} does not match the last dim of {x}")
    return [x]


@register_op("rms_norm", "x weight", {"eps": Attr("float")}, infer=_rms_norm_infer, kind="norm",
             native="kernel")
def rms_norm(x, weight, eps):
    """weight * (x * rsqrt(mean(x^2, -1) + eps))"""
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=x.dtype)
    return (weight * (x * (1.0 / np.sqrt(var + np.float32(eps))))).astype(x.dtype)


def _rope_infer(ts, at):
    x, cos, sin = ts
    same_dtype(ts)
    if cos.shape != sin.shape or broadcast_shapes(x.shape, cos.shape) != x.shape:
        fail(f"rope tables {cos}, {sin} do not broadcast to {x}")
    if isinstance(x.shape[-1], int) and x.shape[-1] % 2:
        fail("rope needs an even head dim")
    return [x]


def rotate(x, interleaved: bool):
    """The 'rotated' partner of x: (-x2, x1) for the halves, or per (even, odd) pair."""
    if interleaved:
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
        return out
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@register_op("rope", "x cos sin", {"interleaved": Attr("bool", False)}, infer=_rope_infer, kind="rope",
             native="kernel")
def rope(x, cos, sin, interleaved):
    """x * cos + rotate(x) * sin: rotate-half (HF) or interleaved pairs (GPT-J, llama.cpp)."""
    return (x * cos + rotate(x, interleaved) * sin).astype(x.dtype)


def _attention_infer(ts, at):
    q, k, v, pos = ts[:4]
    same_dtype(ts[:3])
    if len(ts) == 5 and (ts[4].dtype != bool_ or ts[4].shape != pos.shape):
        fail(f"attention key_valid must be bool{list(pos.shape)}, got {ts[4]}")
    if not (q.rank == k.rank == v.rank == 4) or pos.rank != 2 or pos.dtype != i64:
        fail("attention takes q, k, v as [b, heads, s, d] and positions as i64[b, s]")
    if k.shape != v.shape[:3] + (k.shape[3],) or q.shape[3] != k.shape[3] or q.shape[2] != k.shape[2]:
        fail(f"attention: q {q}, k {k}, v {v} do not conform")
    hq, hk = q.shape[1], k.shape[1]
    if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
        fail(f"attention: {hq} query heads are not a multiple of {hk} kv heads")
    if pos.shape != (q.shape[0], q.shape[2]):
        fail(f"attention positions {pos} do not match queries {q}")
    return [q.with_shape(q.shape[:3] + (v.shape[3],))]


def position_mask(q_pos, k_pos, causal: bool, window: int):
    """[b, 1, sq, sk] bool: key j is visible from query i.  Masks are defined on positions, so
    one rule serves the full sequence, prefill and decode over a cache."""
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    mask = kp <= qp if causal else np.ones(np.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
    if window:
        mask = mask & (qp - kp < window)
    return mask


#: batch rows attend in slices whose score matrices stay under this many elements (8 MB of f32
#: scores: one 512-token row of SmolLM2 at a time, which stays in cache; a calibration run's
#: 32 x 512-token batch would otherwise sweep several 300 MB temporaries through memory)
ATTEND_SLICE_ELEMENTS = 1 << 21

#: queries attend in blocks of this many, each over the keys up to the last one its mask shows:
#: a causal prefill skips the upper triangle's products and exps (about 40 % of the work)
ATTEND_QUERY_BLOCK = 128


def attend(q, k, v, mask, scale):
    """softmax(q k^T * scale, masked) v in float64 (nn.ACCUMULATE), with grouped kv heads; batch
    rows in slices (each row is computed alone either way, so slicing changes no bit)."""
    b = q.shape[0]
    per_row = max(1, q.shape[1] * q.shape[2] * k.shape[2])
    step = max(1, ATTEND_SLICE_ELEMENTS // per_row)
    if b > step:
        mask = np.broadcast_to(mask, (b, *mask.shape[1:]))
        return np.concatenate([_attend(q[i:i + step], k[i:i + step], v[i:i + step], mask[i:i + step], scale)
                               for i in range(0, b, step)])
    return _attend(q, k, v, mask, scale)


def _attend(q, k, v, mask, scale):
    """The query heads sharing a kv head go through one product ([rep * queries, d] x [d, keys])
    instead of repeating k and v per head; masked keys get exactly zero weight, so cutting the
    keys a block cannot see changes only the length of zero runs in the sums."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    rep = hq // hk
    acc, dtype = ACCUMULATE["dtype"], q.dtype
    q, k, v = (t.astype(acc, copy=False) for t in (q, k, v))
    out = np.empty((b, hk, rep, s, v.shape[-1]), acc)
    hidden = ~mask
    for i0 in range(0, s, ATTEND_QUERY_BLOCK):
        i1 = min(s, i0 + ATTEND_QUERY_BLOCK)
        shown = np.flatnonzero(mask[..., i0:i1, :].any(axis=tuple(range(mask.ndim - 1))))
        n = int(shown[-1]) + 1 if shown.size else 1
        scores = np.matmul(q[:, :, i0:i1].reshape(b, hk, rep, i1 - i0, d),
                           np.swapaxes(k[:, :, None, :n], -1, -2))          # [b, hk, rep, block, n]
        np.multiply(scores, acc(scale), out=scores)
        np.copyto(scores, -np.inf, where=hidden[:, :, None, i0:i1, :n])
        np.matmul(_softmax_in_place(scores), v[:, :, None, :n], out=out[:, :, :, i0:i1])
    return out.reshape(b, hq, s, -1).astype(dtype, copy=False)


def _softmax_in_place(e):
    """softmax over the last axis of scores whose hidden entries are -inf; a row with no visible
    key gives zeros (not NaN), the convention of flash-attention kernels."""
    top = np.max(e, axis=-1, keepdims=True)
    np.subtract(e, np.where(np.isfinite(top), top, 0), out=e)
    np.exp(e, out=e)
    total = np.sum(e, axis=-1, keepdims=True)
    return np.divide(e, np.where(total > 0, total, 1), out=e)


def masked_softmax(scores, mask):
    """softmax over the last axis where `mask`; a row with no visible key gives zeros (not NaN),
    the convention of flash-attention kernels, so padded queries stay finite."""
    return _softmax_in_place(np.where(mask, scores, -np.inf))   # one buffer, worked in place


@register_op("attention", "q k v positions key_valid?",
             {"scale": Attr("float"), "causal": Attr("bool", True), "window": Attr("int", 0)},
             infer=_attention_infer, kind="attention")
def attention(q, k, v, positions, key_valid=None, *, scale, causal, window):
    """Multi-head / grouped-query attention with a position mask (causal, optional sliding
    window) and an optional key-padding mask (False = padding token)."""
    mask = position_mask(positions, positions, causal, window)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return attend(q, k, v, mask, scale)


def _mlp_swiglu_infer(ts, at):
    x, wg, wu, wd = ts
    for w in ts[1:]:
        check_weight(w, x, "mlp_swiglu")
    if not (wg.shape == wu.shape and wg.shape[1] == x.shape[-1] and wd.shape == (x.shape[-1], wg.shape[0])):
        fail(f"mlp_swiglu weights {wg}, {wu}, {wd} do not fit {x}")
    return [x]


def _swiglu_input(position, x, w_gate, w_up, w_down, *, types):
    """What each weight multiplies: x for gate and up, silu(gate(x)) * up(x) for down."""
    if position != 3:
        return x
    wg, wu = weight_value(w_gate, types[1]), weight_value(w_up, types[2])
    rows = x.reshape(-1, x.shape[-1])
    if len(rows) <= SWIGLU_ROWS:
        g = linear(rows, wg)
        return np.multiply(silu_in_place(g), linear(rows, wu), out=g).reshape(x.shape[:-1] + (wg.shape[0],))
    # rows at a time into the result: whole-input gate and up products are two more arrays of
    # the result's size (a direct interpreter run on many tokens; calibration already hands
    # ops 2,048-token chunks, passes/calibration.py)
    h = np.empty((len(rows), wg.shape[0]), x.dtype)
    for r in range(0, len(rows), SWIGLU_ROWS):
        g = linear(rows[r:r + SWIGLU_ROWS], wg)
        np.multiply(silu_in_place(g), linear(rows[r:r + SWIGLU_ROWS], wu), out=h[r:r + SWIGLU_ROWS])
    return h.reshape(x.shape[:-1] + (wg.shape[0],))


SWIGLU_ROWS = 4096       # rows of x a hidden layer takes at a time above that many
SILU_BLOCK = 1 << 15     # elements a pass of silu_in_place takes: 128 KB of float32, in L2


def silu_in_place(g):
    """g / (1 + exp(-g)) in g's buffer, the same operations in the same order as that expression
    (so the same bits), without its three temporaries of g's size (a calibration run's are
    16 K tokens x the MLP width), and a block at a time, so its four passes stay in cache: 4x
    faster than whole-array passes at 16 K x 1536 (Zen 3)."""
    if not g.flags.c_contiguous:              # no flat view of its buffer: whole-array passes
        return _silu_pass(g, np.empty_like(g))
    flat = g.reshape(-1)
    t = np.empty(min(SILU_BLOCK, flat.size), g.dtype)
    for i in range(0, flat.size, SILU_BLOCK):
        c = flat[i:i + SILU_BLOCK]
        _silu_pass(c, t[:c.size])
    return g


def _silu_pass(g, t):
    np.negative(g, out=t)
    np.exp(t, out=t)
    np.add(t, g.dtype.type(1.0), out=t)
    return np.divide(g, t, out=g)


def _swiglu_output(hidden, x, w_gate, w_up, w_down, *, types):
    return linear(hidden, weight_value(w_down, types[3]))


@register_op("mlp_swiglu", "x w_gate w_up w_down", infer=_mlp_swiglu_infer, weights=(1, 2, 3),
             weight_input=_swiglu_input, weight_output=_swiglu_output, kind="mlp", native="linear")
def mlp_swiglu(x, w_gate, w_up, w_down, *, types):
    """down(silu(gate(x)) * up(x)); weights f32 or nf4"""
    args = (x, w_gate, w_up, w_down)
    return _swiglu_output(_swiglu_input(3, *args, types=types), *args, types=types)


def _mlp_gelu_infer(ts, at):
    x, w1, w2 = ts[:3]
    check_weight(w1, x, "mlp_gelu")
    check_weight(w2, x, "mlp_gelu")
    same_dtype([x, *ts[3:]], "activation and biases")
    if w1.shape[1] != x.shape[-1] or w2.shape != (x.shape[-1], w1.shape[0]):
        fail(f"mlp_gelu weights {w1}, {w2} do not fit {x}")
    if len(ts) == 5 and (ts[3].shape != (w1.shape[0],) or ts[4].shape != (w2.shape[0],)):
        fail("mlp_gelu biases do not fit the weights")
    if len(ts) == 4:
        fail("mlp_gelu takes both biases or none")
    return [x]


def _gelu_mlp_input(position, x, w_fc, w_proj, b_fc=None, b_proj=None, *, approximate, types):
    """What each weight multiplies: x for fc, gelu(fc(x)) for proj."""
    if position != 2:
        return x
    return gelu(linear(x, weight_value(w_fc, types[1]), b_fc), approximate)


def _gelu_mlp_output(hidden, x, w_fc, w_proj, b_fc=None, b_proj=None, *, approximate, types):
    return linear(hidden, weight_value(w_proj, types[2]), b_proj)


@register_op("mlp_gelu", "x w_fc w_proj b_fc? b_proj?", {"approximate": Attr("str", "none")},
             infer=_mlp_gelu_infer, weights=(1, 2), weight_input=_gelu_mlp_input,
             weight_output=_gelu_mlp_output, kind="mlp", native="linear")
def mlp_gelu(x, w_fc, w_proj, b_fc=None, b_proj=None, *, approximate, types):
    """proj(gelu(fc(x))); weights f32 or nf4"""
    args = (x, w_fc, w_proj, b_fc, b_proj)
    h = _gelu_mlp_input(2, *args, approximate=approximate, types=types)
    return _gelu_mlp_output(h, *args, approximate=approximate, types=types)



"""Yuan 2.0's Localized Filtering (LF): two causal kernel-2 convolutions over the sequence, then
RMSNorm of (conv output + input).  research/yuan_tp.md §1.2 has the semantics:

    o1[t] = W1 . [x[t-1] ; x[t]] + b1        (x[-1] = 0)
    o2[t] = W2 . [o1[t-1] ; o1[t]] + b2      (o1[-1] = 0: zero padding, not conv1 of zeros)
    y[t]  = rms_norm(o2[t] + x[t])

`localized_filter` is the whole block on a full sequence (what the frontend traces).  Over a KV
cache (the kv-cache pass) it becomes the ops below, which every native tier runs:
`lf_state` stores this step's LF inputs at their positions in the cache's state slots and
returns them with the two inputs before the chunk (zeros before position 0); `lf_pairs` pairs
each row with its successor ([prev ; cur]), zeroing rows before position 0; each convolution
is then an ordinary `linear` over those pairs, so it gets the linear kernels (and NF4)."""
from __future__ import annotations

import numpy as np

from .. import dims as D
from ..attrs import Attr
from ..dtypes import i64
from ..registry import register_op
from ..types import KVCacheType
from ._shapes import fail, same_dtype
from .fused import rms_norm


def _shifted(v: np.ndarray) -> np.ndarray:
    """v one step later along the sequence: row t holds v[t-1], row 0 zeros."""
    return np.concatenate([np.zeros_like(v[:, :1]), v[:, :-1]], axis=1)


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A causal kernel-2 convolution as a product over [prev ; cur] pairs, summed in float64."""
    pairs = np.concatenate([_shifted(x), x], axis=-1).astype(np.float64)
    return (pairs @ w.T.astype(np.float64) + b).astype(x.dtype)


def _lf_infer(ts, at):
    x, w1, b1, w2, b2, weight = ts
    same_dtype(ts)
    if x.rank != 3:
        fail(f"localized_filter takes x as [b, s, hidden], got {x}")
    h = x.shape[2]
    if w1.rank != 2 or w1.shape[1] != D.binary("*", 2, h) or b1.shape != (w1.shape[0],):
        fail(f"conv1 {w1} / {b1} do not take [prev ; cur] pairs of {x}")
    if w2.shape != (h, D.binary("*", 2, w1.shape[0])) or b2.shape != (h,) or weight.shape != (h,):
        fail(f"conv2 {w2} / {b2} or norm weight {weight} do not fit conv1 {w1} and {x}")
    return [x]


@register_op("localized_filter", "x w1 b1 w2 b2 weight", {"eps": Attr("float")}, infer=_lf_infer,
             kind="lf")
def localized_filter(x, w1, b1, w2, b2, weight, *, eps):
    """rms_norm(conv2(conv1(x)) + x): Yuan's LF on a whole sequence from position 0."""
    o1 = _conv(x, w1, b1)
    o2 = _conv(o1, w2, b2)
    return rms_norm(o2 + x, weight, eps)


def _state_infer(ts, at):
    x, pos, cache = ts
    if not isinstance(cache, KVCacheType):
        fail("lf_state needs a kv_cache operand")
    if x.rank != 3 or pos.dtype != i64 or pos.shape != x.shape[:2]:
        fail(f"lf_state takes x [b, s, hidden] and i64 positions [b, s], got {x}, {pos}")
    if at["slots"] < 1 or not 0 <= at["slot"] <= cache.state - at["slots"]:
        fail(f"state slots {at['slot']}..{at['slot'] + at['slots'] - 1} are outside the cache's {cache.state}")
    if x.shape[2] != at["slots"] * cache.slot_width or x.dtype != cache.dtype:
        fail(f"{x} does not fill {at['slots']} state slots of {cache.slot_width} {cache.dtype}")
    return [x.with_shape((x.shape[0], D.binary("+", x.shape[1], 2), x.shape[2]))]


@register_op("lf_state", "x positions cache", {"slot": Attr("int"), "slots": Attr("int", 1)},
             infer=_state_infer, side_effects=True, kind="lf", native="kernel")
def lf_state(x, positions, cache, *, slot, slots):
    """[the LF inputs at positions p0-2, p0-1 (zeros below 0) ; x], and x stored at `positions`
    (rows hold consecutive positions from p0, as every step batch does)."""
    width = x.shape[2] // slots
    p0 = positions[:, :1]
    before = np.concatenate([p0 - 2, p0 - 1], axis=1)
    hist = np.concatenate([cache.read_state(slot + i, before) for i in range(slots)], axis=-1)
    for i in range(slots):
        cache.write_state(slot + i, positions, np.ascontiguousarray(x[..., i * width:(i + 1) * width]))
    return np.concatenate([hist.astype(x.dtype), x], axis=1)


def _pairs_infer(ts, at):
    x, pos = ts
    if x.rank != 3 or pos.dtype != i64 or pos.rank != 2:
        fail(f"lf_pairs takes x [b, n, c] and i64 positions [b, s], got {x}, {pos}")
    return [x.with_shape((x.shape[0], D.binary("-", x.shape[1], 1), D.binary("*", 2, x.shape[2])))]


@register_op("lf_pairs", "x positions", {"offset": Attr("int")}, infer=_pairs_infer, kind="lf",
             native="kernel")
def lf_pairs(x, positions, *, offset):
    """Row i = [x[i] ; x[i+1]], where row j of x is the value at position p0 - offset + j and is
    taken as zero when that position is below 0 (the convolutions' zero padding)."""
    p = positions[:, :1] - offset + np.arange(x.shape[1])[None, :]
    x = np.where((p >= 0)[..., None], x, 0).astype(x.dtype)
    return np.ascontiguousarray(np.concatenate([x[:, :-1], x[:, 1:]], axis=-1))

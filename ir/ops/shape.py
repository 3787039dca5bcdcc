"""Layout ops: reshape, permute, expand, slice, concat, split, advanced indexing."""
from __future__ import annotations

import numpy as np

from .. import dims as D
from ..attrs import Attr
from ..dtypes import i32, i64
from ..registry import register_op
from ..types import TensorType
from ._shapes import broadcast_shapes, fail, norm_axis, same_dtype


def _reshape_infer(ts, at):
    shape = at["shape"]
    if any(isinstance(d, int) and d < 0 for d in shape):
        fail("reshape shape must be fully resolved (no -1)")
    if D.same_numel(ts[0].shape, shape) is False:
        fail(f"cannot reshape {D.fmt_shape(ts[0].shape)} to {D.fmt_shape(shape)}")
    return [ts[0].with_shape(shape)]


@register_op("reshape", "x", {"shape": Attr("dims")}, infer=_reshape_infer, native="alias")
def reshape(x, shape, env):
    return x.reshape([D.evaluate(d, env) for d in shape])


def _permute_infer(ts, at):
    perm = at["perm"]
    if sorted(perm) != list(range(ts[0].rank)):
        fail(f"perm {list(perm)} is not a permutation of rank {ts[0].rank}")
    return [ts[0].with_shape(ts[0].shape[p] for p in perm)]


@register_op("permute", "x", {"perm": Attr("ints")}, infer=_permute_infer, native="kernel")
def permute(x, perm):
    return np.ascontiguousarray(np.transpose(x, perm))


def _expand_infer(ts, at):
    shape, src = at["shape"], ts[0].shape
    if len(shape) < len(src):
        fail("expand cannot drop dims")
    for s, d in zip(src, shape[len(shape) - len(src):]):
        if s != d and s != 1:
            fail(f"cannot expand {D.fmt_shape(src)} to {D.fmt_shape(shape)}")
    return [ts[0].with_shape(shape)]


@register_op("expand", "x", {"shape": Attr("dims")}, infer=_expand_infer)
def expand(x, shape, env):
    return np.ascontiguousarray(np.broadcast_to(x, [D.evaluate(d, env) for d in shape]))


def _slice_len(start, end, step):
    n = D.binary("-", end, start)
    return n if step == 1 else D.binary("//", D.binary("+", n, step - 1), step)


def _slice_infer(ts, at):
    t = ts[0]
    axis = norm_axis(at["axis"], t.rank)
    if at["step"] < 1:
        fail("slice step must be positive")
    for bound in (at["start"], at["end"]):
        if isinstance(bound, int) and bound < 0:
            fail("slice bounds must be resolved to non-negative positions")
    shape = list(t.shape)
    shape[axis] = _slice_len(at["start"], at["end"], at["step"])
    if isinstance(shape[axis], int) and shape[axis] < 0:
        fail("slice end is before its start")
    return [t.with_shape(shape)]


@register_op("slice", "x", {"axis": Attr("int"), "start": Attr("dim", 0), "end": Attr("dim"),
                            "step": Attr("int", 1)}, infer=_slice_infer)
def slice_(x, axis, start, end, step, env):
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(D.evaluate(start, env), D.evaluate(end, env), step)
    return np.ascontiguousarray(x[tuple(idx)])


def _concat_infer(ts, at):
    dt = same_dtype(ts)
    axis = norm_axis(at["axis"], ts[0].rank)
    shape = list(ts[0].shape)
    for t in ts[1:]:
        if t.rank != len(shape):
            fail("concat inputs must share a rank")
        for i, (a, b) in enumerate(zip(shape, t.shape)):
            if i != axis and a != b:
                fail(f"concat inputs differ in dim {i}: {a} vs {b}")
        shape[axis] = D.binary("+", shape[axis], t.shape[axis])
    return [TensorType(dt, tuple(shape))]


@register_op("concat", "xs*", {"axis": Attr("int")}, infer=_concat_infer, native="kernel")
def concat(*xs, axis):
    return np.concatenate(xs, axis=axis)


def _split_infer(ts, at):
    t = ts[0]
    axis = norm_axis(at["axis"], t.rank)
    total = 0
    for s in at["sizes"]:
        total = D.binary("+", total, s)
    if total != t.shape[axis]:
        fail(f"split sizes {list(at['sizes'])} do not add up to dim {t.shape[axis]}")
    outs = []
    for s in at["sizes"]:
        shape = list(t.shape)
        shape[axis] = s
        outs.append(t.with_shape(shape))
    return outs


@register_op("split", "x", {"axis": Attr("int"), "sizes": Attr("dims")}, infer=_split_infer,
             native="kernel")
def split(x, axis, sizes, env):
    bounds = np.cumsum([D.evaluate(s, env) for s in sizes])[:-1]
    return tuple(np.ascontiguousarray(p) for p in np.split(x, bounds, axis=axis))


def _index_infer(ts, at):
    x, idx = ts[0], ts[1:]
    axes = [norm_axis(a, x.rank) for a in at["axes"]]
    if len(axes) != len(idx) or sorted(set(axes)) != axes:
        fail("index needs one index tensor per listed axis, axes ascending")
    if any(t.dtype not in (i64, i32) for t in idx):
        fail("index tensors must be i64 or i32")
    bshape = broadcast_shapes(*(t.shape for t in idx))
    rest = [d for i, d in enumerate(x.shape) if i not in axes]
    if axes == list(range(axes[0], axes[-1] + 1)):      # adjacent: result replaces them in place
        shape = list(x.shape[:axes[0]]) + list(bshape) + list(x.shape[axes[-1] + 1:])
    else:                                                # numpy/torch: broadcast dims go first
        shape = list(bshape) + rest
    return [x.with_shape(shape)]


@register_op("index", "x indices*", {"axes": Attr("ints")}, infer=_index_infer)
def index(x, *indices, axes):
    """Advanced (gather) indexing as torch's x[..., idx, ...] with full slices elsewhere."""
    key = [slice(None)] * x.ndim
    for a, i in zip(axes, indices):
        key[a] = i
    return np.ascontiguousarray(x[tuple(key)])



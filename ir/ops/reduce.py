"""Reductions and scans along axes."""
from __future__ import annotations

import numpy as np

from ..attrs import Attr
from ..dims import binary
from ..registry import register_op
from ..types import TensorType
from ._shapes import fail, norm_axis


def _reduce_infer(ts, at):
    t = ts[0]
    axes = {norm_axis(a, t.rank) for a in at["axes"]}
    if len(axes) != len(at["axes"]):
        fail("repeated reduction axis")
    shape = [1 if i in axes else d for i, d in enumerate(t.shape) if at["keepdim"] or i not in axes]
    return [t.with_shape(shape)]


_REDUCE_ATTRS = {"axes": Attr("ints"), "keepdim": Attr("bool", False)}


@register_op("sum", "x", _REDUCE_ATTRS, infer=_reduce_infer)
def sum_(x, axes, keepdim):
    return np.sum(x, axis=tuple(axes), keepdims=keepdim, dtype=x.dtype)


@register_op("mean", "x", _REDUCE_ATTRS, infer=_reduce_infer)
def mean(x, axes, keepdim):
    return np.mean(x, axis=tuple(axes), keepdims=keepdim, dtype=x.dtype)


@register_op("max", "x", _REDUCE_ATTRS, infer=_reduce_infer)
def max_(x, axes, keepdim):
    return np.max(x, axis=tuple(axes), keepdims=keepdim)


@register_op("cumsum", "x", {"axis": Attr("int")},
             infer=lambda ts, at: (norm_axis(at["axis"], ts[0].rank), [ts[0]])[1])
def cumsum(x, axis):
    return np.cumsum(x, axis=axis, dtype=x.dtype)


def _diff_infer(ts, at):
    x = ts[0]
    axis = norm_axis(at["axis"], x.rank)
    n = x.shape[axis]
    for extra in ts[1:]:
        if extra.dtype != x.dtype or extra.rank != x.rank:
            fail("diff prepend/append must match the input's dtype and rank")
        n = binary("+", n, extra.shape[axis])
    shape = list(x.shape)
    shape[axis] = binary("-", n, at["n"])
    return [TensorType(x.dtype, tuple(shape))]


@register_op("diff", "x prepend?", {"axis": Attr("int"), "n": Attr("int", 1)}, infer=_diff_infer)
def diff(x, prepend=None, *, axis, n):
    """n-th discrete difference along `axis`, optionally prepending values first (torch.diff)."""
    if prepend is not None:
        x = np.concatenate([prepend, x], axis=axis)
    return np.diff(x, n=n, axis=axis)


@register_op("softmax", "x", {"axis": Attr("int")},
             infer=lambda ts, at: (norm_axis(at["axis"], ts[0].rank), [ts[0]])[1])
def softmax(x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(x.dtype)

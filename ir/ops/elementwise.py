"""Elementwise ops: numpy-broadcasting binary arithmetic and comparisons, unary math, casts.

Binary ops require both inputs to have the same dtype (frontends insert explicit casts), so type
promotion never happens implicitly inside the IR.
"""
from __future__ import annotations

import math

import numpy as np

from ..attrs import Attr
from ..dtypes import bool_
from ..registry import register_op
from ..types import TensorType
from ._shapes import broadcast_shapes, fail, same_dtype


def _binary_infer(result_dtype=None, floats_only=False, bools_only=False):
    def infer(ts: list[TensorType], attrs):
        dt = same_dtype(ts)
        if floats_only and not dt.is_float:
            fail(f"needs float inputs, got {dt}")
        if bools_only and dt != bool_:
            fail(f"needs bool inputs, got {dt}")
        return [TensorType(result_dtype or dt, broadcast_shapes(*(t.shape for t in ts)))]
    return infer


def _unary_infer(floats_only=True, bools_only=False):
    def infer(ts: list[TensorType], attrs):
        dt = ts[0].dtype
        if floats_only and not dt.is_float:
            fail(f"needs a float input, got {dt}")
        if bools_only and dt != bool_:
            fail(f"needs a bool input, got {dt}")
        return [ts[0]]
    return infer


def _same(x, like):
    return np.asarray(x).astype(like.dtype, copy=False)


_ARITH = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum,
          "minimum": np.minimum}
_COMMUTATIVE = {"add", "mul", "maximum", "minimum", "eq", "ne", "logical_and", "logical_or"}
_NATIVE = {"add": "binary:Add", "sub": "binary:Sub", "mul": "binary:Mul"}
for _name, _fn in _ARITH.items():
    register_op(_name, "a b", infer=_binary_infer(), commutative=_name in _COMMUTATIVE,
                native=_NATIVE.get(_name))((lambda f: lambda a, b: _same(f(a, b), a))(_fn))


@register_op("div", "a b", infer=_binary_infer(floats_only=True), native="binary:Div")
def div(a, b):
    """True division of floats."""
    return _same(np.divide(a, b), a)


@register_op("pow", "a b", infer=_binary_infer(floats_only=True))
def pow_(a, b):
    return _same(np.power(a, b), a)


_COMPARE = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
            "gt": np.greater, "ge": np.greater_equal}
for _name, _fn in _COMPARE.items():
    register_op(_name, "a b", infer=_binary_infer(result_dtype=bool_),
                commutative=_name in _COMMUTATIVE)((lambda f: lambda a, b: f(a, b))(_fn))

register_op("logical_and", "a b", infer=_binary_infer(bools_only=True), commutative=True)(
    lambda a, b: np.logical_and(a, b))
register_op("logical_or", "a b", infer=_binary_infer(bools_only=True), commutative=True)(
    lambda a, b: np.logical_or(a, b))
register_op("logical_not", "x", infer=_unary_infer(floats_only=False, bools_only=True))(
    lambda x: np.logical_not(x))
register_op("isnan", "x", infer=lambda ts, at: (
    fail(f"isnan needs a float input, got {ts[0].dtype}") if not ts[0].dtype.is_float
    else [ts[0].with_dtype(bool_)]))(lambda x: np.isnan(x))


@register_op("where", "cond a b", infer=lambda ts, at: (
    fail("cond must be bool") if ts[0].dtype != bool_ else
    [TensorType(same_dtype(ts[1:]), broadcast_shapes(*(t.shape for t in ts)))]))
def where(cond, a, b):
    return _same(np.where(cond, a, b), a)


def _float_unary(name, fn, native=None):
    register_op(name, "x", infer=_unary_infer(), native=native)(lambda x: _same(fn(x), x))


_float_unary("exp", np.exp, "unary:Exp")
_float_unary("log", np.log)
_float_unary("sqrt", np.sqrt)
_float_unary("rsqrt", lambda x: 1.0 / np.sqrt(x))
_float_unary("sin", np.sin, "unary:Sin")
_float_unary("cos", np.cos, "unary:Cos")
_float_unary("tanh", np.tanh)
_float_unary("reciprocal", lambda x: 1.0 / x)
_float_unary("sigmoid", lambda x: 1.0 / (1.0 + np.exp(-x)))
_float_unary("silu", lambda x: x / (1.0 + np.exp(-x)), "unary:Silu")
_float_unary("relu", lambda x: np.maximum(x, 0))
register_op("neg", "x", infer=_unary_infer(floats_only=False), native="unary:Neg")(lambda x: np.negative(x))
register_op("abs", "x", infer=_unary_infer(floats_only=False))(lambda x: np.abs(x))

_erf = np.frompyfunc(math.erf, 1, 1)


@register_op("gelu", "x", {"approximate": Attr("str", "none")}, infer=_unary_infer(), native="kernel")
def gelu(x, approximate):
    """GELU; 'tanh' is the GPT-2 approximation, 'none' the exact erf form."""
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)
        return _same(0.5 * x * (1.0 + np.tanh(inner)), x)
    x64 = x.astype(np.float64)
    return _same(0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)).astype(np.float64)), x)


@register_op("cast", "x", {"dtype": Attr("dtype")},
             infer=lambda ts, at: [ts[0].with_dtype(at["dtype"])], native="kernel")
def cast(x, dtype):
    return x.astype(dtype.storage)

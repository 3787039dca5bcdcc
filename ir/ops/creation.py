"""Ops that create tensors from attributes alone: scalar constants, ranges, fills."""
from __future__ import annotations

import numpy as np

from .. import dims as D
from ..attrs import Attr
from ..registry import register_op
from ..types import TensorType
from ._shapes import fail


@register_op("constant", "", {"value": Attr("any"), "dtype": Attr("dtype")},
             infer=lambda ts, at: (
                 fail("constant value must be a bool, int or float")
                 if not isinstance(at["value"], (bool, int, float)) else [TensorType(at["dtype"], ())]))
def constant(value, dtype):
    """A scalar; tensor constants are module parameters instead."""
    return np.array(value, dtype=dtype.storage)


def _arange_infer(ts, at):
    if at["step"] < 1:
        fail("arange step must be positive")
    n = D.binary("-", at["end"], at["start"])
    if at["step"] != 1:
        n = D.binary("//", D.binary("+", n, at["step"] - 1), at["step"])
    return [TensorType(at["dtype"], (n,))]


@register_op("arange", "", {"start": Attr("dim", 0), "end": Attr("dim"), "step": Attr("int", 1),
                            "dtype": Attr("dtype")}, infer=_arange_infer)
def arange(start, end, step, dtype, env):
    return np.arange(D.evaluate(start, env), D.evaluate(end, env), step).astype(dtype.storage)


@register_op("full", "", {"shape": Attr("dims"), "value": Attr("any"), "dtype": Attr("dtype")},
             infer=lambda ts, at: [TensorType(at["dtype"], at["shape"])])
def full(shape, value, dtype, env):
    return np.full([D.evaluate(d, env) for d in shape], value, dtype=dtype.storage)

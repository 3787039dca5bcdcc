"""Ops over quantized weights.  An `nf4` parameter holds codes and scales in one byte array
(ir/formats/nf4.py); references decode it with the layout its type describes and then compute
exactly what the float op would on the decoded weight, so quantization error lives in the weight
alone and every kernel is judged against the same decoded numbers."""
from __future__ import annotations

import numpy as np

from ..registry import register_op
from ..types import TensorType
from ._shapes import fail
from .nn import linear


def is_nf4(t) -> bool:
    return isinstance(t, TensorType) and t.dtype.name == "nf4"


def is_quantized(t) -> bool:
    return isinstance(t, TensorType) and t.is_quantized


def check_weight(w: TensorType, x: TensorType, what: str) -> None:
    """A weight operand of a float op: the activation's dtype, or a valid nf4/q8 encoding."""
    if is_quantized(w):
        try:
            w.quant_layout()
        except ValueError as e:
            fail(f"{what}: {e}")
    elif w.dtype != x.dtype:
        fail(f"{what}: weight {w} does not match the activation dtype {x.dtype}")


def weight_value(arr: np.ndarray, t: TensorType) -> np.ndarray:
    """The float weight an operand stands for (decoded if nf4 or q8)."""
    return t.quant_layout().dequantize(arr) if is_quantized(t) else arr


def _quantized_linear_infer(op: str, dtype: str):
    def infer(ts, at):
        x, w = ts[0], ts[1]
        if not (isinstance(w, TensorType) and w.dtype.name == dtype) or w.rank != 2:
            fail(f"{op} needs a {dtype}[out, in] weight, got {w}")
        check_weight(w, x, op)
        if not x.dtype.is_float or x.rank < 1 or x.shape[-1] != w.shape[1]:
            fail(f"{op}: x {x} does not match weight [out, in] {w}")
        if len(ts) == 3 and (ts[2].shape != (w.shape[0],) or ts[2].dtype != x.dtype):
            fail(f"{op}: bias {ts[2]} does not match {w.shape[0]} outputs of {x.dtype}")
        return [x.with_shape(x.shape[:-1] + (w.shape[0],))]
    return infer


_linear_nf4_infer = _quantized_linear_infer("linear_nf4", "nf4")


@register_op("linear_nf4", "x weight bias?", infer=_linear_nf4_infer, weights=(1,), native="linear")
def linear_nf4(x, weight, bias=None, *, types):
    """x @ dequantize(weight).T (+ bias)"""
    return linear(x, weight_value(weight, types[1]), bias)


@register_op("linear_q8", "x weight bias?", infer=_quantized_linear_infer("linear_q8", "q8"), weights=(1,),
             native="linear")
def linear_q8(x, weight, bias=None, *, types):
    """x @ dequantize(weight).T (+ bias), weight int8 codes with block-64 scales"""
    return linear(x, weight_value(weight, types[1]), bias)

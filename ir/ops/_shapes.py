"""Shape helpers shared by the op definitions' type inference."""
from __future__ import annotations

from ..dims import Dim
from ..registry import TypeInferenceError
from ..types import TensorType


def fail(msg: str):
    raise TypeInferenceError(msg)


def norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        fail(f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_dim(a: Dim, b: Dim) -> Dim:
    if a == b or b == 1:
        return a
    if a == 1:
        return b
    fail(f"dims {a} and {b} do not broadcast")


def broadcast_shapes(*shapes) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        d: Dim = 1
        for s in shapes:
            j = i - (rank - len(s))
            if j >= 0:
                d = broadcast_dim(d, s[j])
        out.append(d)
    return tuple(out)


def same_dtype(types: list[TensorType], what: str = "inputs"):
    dts = {t.dtype for t in types}
    if len(dts) > 1:
        fail(f"{what} must share one dtype, got {', '.join(str(t.dtype) for t in types)}")
    return types[0].dtype

"""fuse-rope: rotary position embedding, rotate-half (HF Llama) and interleaved (GPT-J) forms."""
from __future__ import annotations

from .base import register_pass
from .pattern import P, RewritePass, Rule


def _half_rule():
    x = P.var("x")
    lo = P.op("slice", x, name="lo")
    hi = P.op("slice", x, name="hi")
    rotated = P.op("concat", P.op("neg", hi), lo)

    def ok(m):
        d = m.x.type.shape[-1]
        last = m.x.type.rank - 1
        if not isinstance(d, int) or d % 2:
            return "head dim is not a static even number"
        spans = [(n.attrs["axis"] % m.x.type.rank, n.attrs["start"], n.attrs["end"], n.attrs["step"])
                 for n in (m.lo, m.hi)]
        if spans != [(last, 0, d // 2, 1), (last, d // 2, d, 1)]:
            return "slices are not the two halves of the last axis"
        return True
    return Rule("rope-half", P.op("add", P.op("mul", x, P.var("cos")), P.op("mul", rotated, P.var("sin"))),
                lambda m, b: b.emit("rope", [m.x, m.cos, m.sin]), where=ok)


def _interleaved_rule():
    x = P.var("x")
    even = P.op("slice", x, name="even")
    odd = P.op("slice", x, name="odd")
    pairs = P.op("concat", P.op("reshape", P.op("neg", odd)), P.op("reshape", even))
    rotated = P.op("reshape", pairs, name="flat")

    def ok(m):
        d, last = m.x.type.shape[-1], m.x.type.rank - 1
        spans = [(n.attrs["axis"] % m.x.type.rank, n.attrs["start"], n.attrs["end"], n.attrs["step"])
                 for n in (m.even, m.odd)]
        if spans != [(last, 0, d, 2), (last, 1, d, 2)]:
            return "slices are not the even/odd elements of the last axis"
        if m.flat.outputs[0].type.shape != m.x.type.shape:
            return "rotated pairs do not flatten back to the input shape"
        return True
    return Rule("rope-interleaved",
                P.op("add", P.op("mul", x, P.var("cos")), P.op("mul", rotated, P.var("sin"))),
                lambda m, b: b.emit("rope", [m.x, m.cos, m.sin], {"interleaved": True}), where=ok)


@register_pass("fuse-rope")
class FuseRoPE(RewritePass):
    """x*cos + rotate(x)*sin  ->  rope(x, cos, sin) {interleaved}"""
    rules = [_half_rule(), _interleaved_rule()]

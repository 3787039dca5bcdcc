"""fuse-swiglu and fuse-gelu-mlp: the feed-forward block of each layer as one op."""
from __future__ import annotations

import math

from .base import register_pass
from .pattern import P, RewritePass, Rule

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
LINEAR = ("linear", "linear_nf4")      # weights may already be quantized (bitsandbytes imports)


def _close(value):
    return lambda c: isinstance(c, float) and abs(c - value) <= 1e-6 * abs(value)


SWIGLU = Rule(
    "swiglu",
    P.op(LINEAR, P.op("mul", P.op("silu", P.op(LINEAR, P.var("x"), P.param("w_gate"), one_use=True),
                                   one_use=True),
                      P.op(LINEAR, P.var("x"), P.param("w_up"), one_use=True), one_use=True),
         P.param("w_down")),
    lambda m, b: b.emit("mlp_swiglu", [m.x, m.w_gate, m.w_up, m.w_down]))

# 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))   (GPT-2's "gelu_new")
_X = P.var("x")
_INNER = P.op("mul", P.op("add", _X, P.op("mul", P.op("pow", _X, P.const("three", _close(3.0))),
                                          P.const("k", _close(0.044715)))),
              P.const("s", _close(_SQRT_2_OVER_PI)))
GELU_TANH = Rule(
    "gelu-tanh",
    P.op("mul", P.op("mul", _X, P.const("half", _close(0.5))),
         P.op("add", P.op("tanh", _INNER), P.const("one", _close(1.0)))),
    lambda m, b: b.emit("gelu", [m.x], {"approximate": "tanh"}))


def _gelu_mlp(with_bias: bool):
    fc_in = [P.var("x"), P.param("w_fc")] + ([P.param("b_fc")] if with_bias else [])
    proj_in = [P.op("gelu", P.op(LINEAR, *fc_in, one_use=True), one_use=True, name="act"),
               P.param("w_proj")] + ([P.param("b_proj")] if with_bias else [])
    return Rule(
        "gelu-mlp", P.op(LINEAR, *proj_in),
        lambda m, b: b.emit("mlp_gelu", [m.x, m.w_fc, m.w_proj] + ([m.b_fc, m.b_proj] if with_bias else []),
                            {"approximate": m.act.attrs["approximate"]}))


@register_pass("fuse-swiglu")
class FuseSwiGLU(RewritePass):
    """down(silu(gate(x)) * up(x))  ->  mlp_swiglu(x, w_gate, w_up, w_down)"""
    rules = [SWIGLU]


@register_pass("fuse-gelu-mlp")
class FuseGeluMLP(RewritePass):
    """proj(gelu(fc(x)))  ->  mlp_gelu(x, ...); the tanh-approximated GELU is recognised first"""
    rules = [GELU_TANH, _gelu_mlp(True), _gelu_mlp(False)]

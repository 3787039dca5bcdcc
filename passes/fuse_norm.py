"""fuse-rms-norm and fuse-layer-norm: the normalization idioms of HF models into one op."""
from __future__ import annotations

from .base import register_pass
from .pattern import P, RewritePass, Rule


def _last_axis(m, *names):
    return all(list(m[n].attrs["axes"]) in ([-1], [m.x.type.rank - 1]) and m[n].attrs["keepdim"]
               for n in names)


def _square(x):
    """x**2 written as pow(x, 2) or x*x."""
    return [P.op("pow", x, P.const("two", lambda c: c == 2)), P.op("mul", x, x)]


def _rms_rules():
    rules = []
    for sq in _square(P.var("x")):
        norm = P.op("mul", P.var("x"), P.op("rsqrt", P.op("add", P.op("mean", sq, name="mean"),
                                                          P.const("eps"))))
        rules.append(Rule(
            "rms-norm", P.op("mul", P.param("w"), norm),
            lambda m, b: b.emit("rms_norm", [m.x, m.w], {"eps": float(m.eps)}),
            where=lambda m: (_last_axis(m, "mean") and m.w.type.shape == m.x.type.shape[-1:])
            or "not a mean over the last axis with a matching weight"))
    return rules


def _layer_norm_rules():
    rules = []
    for sq in _square(P.op("sub", P.var("x"), P.op("mean", P.var("x"), name="mu2"), name="xc2")):
        centered = P.op("sub", P.var("x"), P.op("mean", P.var("x"), name="mu"), name="xc")
        var = P.op("add", P.op("mean", sq, name="var"), P.const("eps"))
        for normed in (P.op("mul", centered, P.op("rsqrt", var)), P.op("div", centered, P.op("sqrt", var))):
            rules.append(Rule(
                "layer-norm", P.op("add", P.op("mul", normed, P.param("w")), P.param("bias")),
                lambda m, b: b.emit("layer_norm", [m.x, m.w, m.bias], {"eps": float(m.eps)}),
                where=lambda m: (m.xc is m.xc2 and _last_axis(m, "mu", "var")
                                 and m.w.type.shape == m.bias.type.shape == m.x.type.shape[-1:])
                or "not a normalization over the last axis"))
    return rules


@register_pass("fuse-rms-norm")
class FuseRMSNorm(RewritePass):
    """w * (x * rsqrt(mean(x^2, -1) + eps))  ->  rms_norm(x, w) {eps}"""
    rules = _rms_rules()


@register_pass("fuse-layer-norm")
class FuseLayerNorm(RewritePass):
    """(x - mean(x)) * rsqrt(var(x) + eps) * w + b  ->  layer_norm(x, w, b) {eps}"""
    rules = _layer_norm_rules()

"""canonicalize: one spelling per computation, so later patterns have one form to match.

Removes identities exporters leave behind (x*1, x+0, no-op reshapes/expands/permutes/slices,
`true & m`), turns GPT-2's Conv1D form `matmul(x, W[in,out]) + b` into `linear(x, Wt, b)`
with the weight transposed at load time, and gives ONNX exporters' spellings the one form the
fusions match: 1/sqrt(x) -> rsqrt(x), x*sigmoid(x) -> silu(x), (a*c1) @ (b*c2) -> (a @ b)*(c1*c2)
(SDPA's split scaling), and a transpose done on merged batch dims -> one permute."""
from __future__ import annotations

from amxc.ir import Module, Param, TensorType

from .base import Pass, register_pass
from .pattern import P, Rule, rewrite


def _same_type(m, a="x", b="root") -> bool:
    return m[a].type == m[b].outputs[0].type


def _is(value):
    return lambda c: c == value and not isinstance(c, bool)


IDENTITIES = [
    Rule("mul-one", P.op("mul", P.var("x"), P.const("c", _is(1)), name="root"), lambda m, b: m.x,
         where=_same_type),
    Rule("add-zero", P.op("add", P.var("x"), P.const("c", _is(0)), name="root"), lambda m, b: m.x,
         where=_same_type),
    Rule("and-true", P.op("logical_and", P.var("x"), P.op("full", value=True, shape=()), name="root"),
         lambda m, b: m.x, where=_same_type),
    Rule("noop-reshape", P.op("reshape", P.var("x"), name="root"), lambda m, b: m.x, where=_same_type),
    Rule("noop-expand", P.op("expand", P.var("x"), name="root"), lambda m, b: m.x, where=_same_type),
    Rule("noop-permute", P.op("permute", P.var("x"), name="root"), lambda m, b: m.x,
         where=lambda m: list(m.root.attrs["perm"]) == sorted(m.root.attrs["perm"])),
    Rule("noop-cast", P.op("cast", P.var("x"), name="root"), lambda m, b: m.x, where=_same_type),
    Rule("rsqrt", P.op("reciprocal", P.op("sqrt", P.var("x"), one_use=True)),
         lambda m, b: b.emit("rsqrt", [m.x])),
    Rule("silu", P.op("mul", P.var("x"), P.op("sigmoid", P.var("x"), one_use=True)),
         lambda m, b: b.emit("silu", [m.x])),
    Rule("scaled-matmul",
         P.op("matmul", P.op("mul", P.var("a"), P.const("c1"), one_use=True),
              P.op("mul", P.var("b"), P.const("c2"), one_use=True), name="root"),
         lambda m, b: b.emit("mul", [b.emit("matmul", [m.a, m.b]),
                                     b.emit("constant", [], {"value": float(m.c1) * float(m.c2),
                                                             "dtype": m.a.type.dtype})]),
         where=lambda m: m.a.type.dtype.is_float and m.a.type.dtype == m.b.type.dtype
         and m.root.outputs[0].type == TensorType(m.a.type.dtype, m.root.outputs[0].type.shape)),
    Rule("batched-transpose",
         P.op("reshape", P.op("permute", P.op("reshape", P.var("x"), one_use=True, name="merge"),
                              one_use=True, name="perm"), name="root"),
         lambda m, b: _unmerged_transpose(m.x, m.root, b),
         where=lambda m: _merged_transpose(m.x, m.merge, m.perm, m.root)),
    Rule("reshape-reshape", P.op("reshape", P.op("reshape", P.var("x"), one_use=True), name="root"),
         lambda m, b: b.emit("reshape", [m.x], {"shape": m.root.attrs["shape"]})),
    # linear acts on the last dim, so flattening the leading dims around it is a no-op
    Rule("linear-through-reshape",
         P.op("reshape", P.op("linear", P.op("reshape", P.var("x"), one_use=True, name="flat"),
                              P.var("w"), one_use=True, name="lin"), name="root"),
         lambda m, b: b.emit("linear", [m.x, *m.lin.inputs[1:]]),
         where=lambda m: (m.x.type.shape[-1] == m.flat.outputs[0].type.shape[-1]
                          and m.root.attrs["shape"] == m.x.type.shape[:-1] + (m.w.type.shape[0],))),
    Rule("linear-through-reshape",
         P.op("reshape", P.op("linear", P.op("reshape", P.var("x"), one_use=True, name="flat"),
                              P.var("w"), P.var("bias"), one_use=True, name="lin"), name="root"),
         lambda m, b: b.emit("linear", [m.x, *m.lin.inputs[1:]]),
         where=lambda m: (m.x.type.shape[-1] == m.flat.outputs[0].type.shape[-1]
                          and m.root.attrs["shape"] == m.x.type.shape[:-1] + (m.w.type.shape[0],))),
]


def _product(dims):
    from amxc.ir import dims as D
    out = 1
    for d in dims:
        out = D.binary("*", out, d)
    return D.canonical(out)


def _merged_transpose(x, merge, perm, root) -> bool:
    """reshape([..., A, B] -> [P, A, B]) . permute(0, 2, 1) . reshape(-> [L..., B, A]) with
    prod(L) = P: a transpose of the last two axes, written on merged leading dims."""
    shape, out = x.type.shape, tuple(root.attrs["shape"])
    if x.type.rank < 3 or len(out) < 3 or list(perm.attrs["perm"]) != [0, 2, 1]:
        return False
    lead = _product(shape[:-2])
    return (tuple(merge.attrs["shape"]) == (lead, *shape[-2:]) and out[-2:] == (shape[-1], shape[-2])
            and _product(out[:-2]) == lead)


def _unmerged_transpose(x, root, b):
    lead = tuple(root.attrs["shape"])[:-2]
    if tuple(x.type.shape[:-2]) != lead:
        x = b.emit("reshape", [x], {"shape": [*lead, *x.type.shape[-2:]]})
    r = x.type.rank
    return b.emit("permute", [x], {"perm": [*range(r - 2), r - 1, r - 2]})


class _Transposed:
    """Loader of a 2-D parameter's transpose (a Conv1D weight stored [in, out])."""

    def __init__(self, param: Param):
        self.param = param

    def __call__(self):
        return self.param.load().T.copy()


def conv1d_as_linear(module: Module):
    def build(m, b):
        w: Param = m.w
        name = w.name + ".T"
        if name not in module.params:
            t = w.type
            module.add_param(Param(name, TensorType(t.dtype, t.shape[::-1]), loader=_Transposed(w)))
        return b.emit("linear", [m.x, module.params[name], m.bias])
    return Rule("conv1d-as-linear",
                P.op("add", P.op("matmul", P.var("x"), P.param("w"), one_use=True), P.param("bias")),
                build, where=lambda m: m.w.type.rank == 2 and m.bias.type.shape == (m.w.type.shape[1],))


@register_pass("canonicalize")
class Canonicalize(Pass):
    def run(self, module: Module) -> bool:
        rules = IDENTITIES + [conv1d_as_linear(module)]
        changed = False
        for fn in module.functions.values():
            changed |= rewrite(fn, rules)
        if changed:
            module.drop_unused_params()
        return changed

"""Structural helpers for passes that build new functions from old ones."""
from __future__ import annotations

from typing import Mapping

from . import dims as D
from .core import Function, Node, Param, Value
from .types import TensorType


def _subst_type(t, env):
    if isinstance(t, TensorType):
        return t.with_shape(D.substitute(d, env) for d in t.shape)
    return t


def _subst_attr(v, env):
    if isinstance(v, D.Sym):
        return D.substitute(v, env)
    if isinstance(v, tuple):
        return tuple(_subst_attr(x, env) for x in v)
    return v


def clone_function(fn: Function, name: str, sizes: Mapping[str, D.Dim] | None = None) -> Function:
    """A deep copy of `fn` named `name`, with symbolic sizes replaced per `sizes` (s -> 1 gives
    the single-token form).  Parameters are shared, values and nodes are new."""
    env = dict(sizes or {})
    new: dict[int, Value] = {}
    args = []
    for a in fn.args:
        args.append(Value(a.name, _subst_type(a.type, env)))
        new[id(a)] = args[-1]
    out = Function(name, args)
    for n in fn.nodes:
        node = Node(n.opdef, [x if isinstance(x, Param) else new[id(x)] for x in n.inputs],
                    {k: _subst_attr(v, env) for k, v in n.attrs.items()},
                    [_subst_type(o.type, env) for o in n.outputs], [o.name for o in n.outputs], n.loc)
        for old, o in zip(n.outputs, node.outputs):
            new[id(old)] = o
        out.nodes.append(node)
    out.results = [x if isinstance(x, Param) else new[id(x)] for x in fn.results]
    return out


def weight_uses(module) -> dict[str, list[tuple]]:
    """param name -> [(node, input position)] for every read of every parameter."""
    out: dict[str, list[tuple]] = {}
    for fn in module.functions.values():
        for n in fn.nodes:
            for i, v in enumerate(n.inputs):
                if isinstance(v, Param):
                    out.setdefault(v.name, []).append((n, i))
    return out


def is_weight_use(node: Node, position: int) -> bool:
    """Whether `node` reads input `position` as a weight matrix (its op's `weights`)."""
    return position in node.opdef.weights


def swap_to_quantized(module, old: Param, new: Param) -> None:
    """Replace weight `old` by the nf4 or q8 parameter `new` (same name and logical shape) in
    every node that reads it, turning each op into its variant for that dtype (linear ->
    linear_nf4, linear_q8).  Every use must be a weight operand (the op's `weights`); output
    types do not change."""
    from .registry import get_op

    for n, i in weight_uses(module).get(old.name, []):
        if not is_weight_use(n, i):
            raise ValueError(f"@{old.name} is read by {n.op} as operand {i}, not as a weight")
        n.inputs[i] = new
        if variant := n.opdef.variant_for(new.type.dtype.name):
            n.opdef = get_op(variant)
    module.params[old.name] = new


swap_to_nf4 = swap_to_quantized


def replace_param(module, old: Param, new: Param) -> None:
    """Every read of `old` (in any function) reads `new` instead, which takes its place in
    module.params (new weight values of the same type: a pass that rescales or rotates)."""
    for fn in module.functions.values():
        for n in fn.nodes:
            n.inputs = [new if v is old else v for v in n.inputs]
    module.params[old.name] = new


def swap_to_float(module, old: Param, new: Param) -> None:
    """The inverse of swap_to_quantized: weight `old` (nf4, q8) becomes the float parameter `new`."""
    from .registry import float_variant, get_op

    for n, i in weight_uses(module).get(old.name, []):
        n.inputs[i] = new
        if back := float_variant(n.op):
            n.opdef = get_op(back)
    module.params[old.name] = new

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

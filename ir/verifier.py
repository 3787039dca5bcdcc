"""Checks the invariants every pass must keep: SSA order, known ops with valid attributes,
parameters owned by the module, and declared types equal to inferred types."""
from __future__ import annotations

from .attrs import AttrError
from .core import Module, Param
from .errors import VerifyError
from .registry import TypeInferenceError


def verify(m: Module) -> None:
    """Raise VerifyError naming the first offending node; return None if the module is valid."""
    if not m.functions:
        raise VerifyError(f"module @{m.name} has no function")
    for p in m.params.values():
        if p.type.is_quantized:
            try:
                p.type.quant_layout()
            except ValueError as e:
                raise VerifyError(f"parameter @{p.name}: {e}") from None
    for fn in m.functions.values():
        defined: set[str] = set()     # names, to catch duplicates
        available: set[int] = set()   # ids of values defined so far, to catch use-before-def
        for a in fn.args:
            if a.name in defined:
                raise VerifyError(f"argument %{a.name} is defined twice", function=fn.name)
            defined.add(a.name)
            available.add(id(a))
        for node in fn.nodes:
            for v in node.inputs:
                if isinstance(v, Param):
                    if m.params.get(v.name) is not v:
                        raise VerifyError(f"parameter @{v.name} is not a parameter of the module",
                                          node, fn.name)
                elif id(v) not in available:
                    raise VerifyError(f"%{v.name} is used before it is defined", node, fn.name)
            try:
                node.opdef.check_arity(len(node.inputs))
                node.opdef.normalize_attrs(node.attrs)
                inferred = node.opdef.infer([v.type for v in node.inputs], node.attrs)
            except (AttrError, TypeInferenceError) as e:
                raise VerifyError(str(e), node, fn.name) from None
            declared = [v.type for v in node.outputs]
            if list(inferred) != declared:
                raise VerifyError(f"declared type {', '.join(map(str, declared))} but the op gives "
                                  f"{', '.join(map(str, inferred))}", node, fn.name)
            for v in node.outputs:
                if v.name in defined:
                    raise VerifyError(f"%{v.name} is defined twice", node, fn.name)
                defined.add(v.name)
                available.add(id(v))
        for v in fn.results:
            if not isinstance(v, Param) and id(v) not in available:
                raise VerifyError(f"returned value %{v.name} is not defined", function=fn.name)

"""The canonical text form of the IR.

One module prints one way: attributes equal to their defaults are omitted, floats print with
``repr`` (exact round trip), symbolic dims canonically.  ``parse(print(m))`` prints identically.
"""
from __future__ import annotations

import json

from .attrs import format_key, format_value
from .core import Function, Module, Node, Param


def format_attrs(attrs: dict, defaults: dict | None = None) -> str:
    shown = {k: v for k, v in attrs.items()
             if v is not None and not (defaults and k in defaults and _same(defaults[k], v))}
    if not shown:
        return ""
    return " {" + ", ".join(f"{format_key(k)} = {format_value(v)}" for k, v in shown.items()) + "}"


def _same(default, v) -> bool:
    return not default.required and type(default.default) is type(v) and default.default == v


def format_node(node: Node) -> str:
    lhs = ", ".join(v.ref for v in node.outputs)
    args = ", ".join(v.ref for v in node.inputs)
    types = ", ".join(str(v.type) for v in node.outputs)
    text = f"{lhs} = {node.op}({args}){format_attrs(node.attrs, node.opdef.attrs)} : {types}"
    if node.loc:
        text += f" loc({json.dumps(node.loc)})"
    return text


def format_param(p: Param) -> str:
    text = f"param @{p.name} : {p.type}"
    text += f" digest({json.dumps(p.digest)})" if p.digest else ""
    return text + (" attributes" + format_attrs(p.attrs) if p.attrs else "")


def format_function(fn: Function, indent: str = "  ") -> str:
    args = ", ".join(f"{a.ref}: {a.type}" for a in fn.args)
    results = ", ".join(str(v.type) for v in fn.results)
    lines = [f"{indent}func @{fn.name}({args}) -> ({results}) {{"]
    lines += [f"{indent}  {format_node(n)}" for n in fn.nodes]
    lines.append(f"{indent}  return {', '.join(v.ref for v in fn.results)}")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def print_module(m: Module) -> str:
    head = f"module @{m.name}"
    if m.attrs:
        head += " attributes" + format_attrs(m.attrs)
    lines = [head + " {"]
    lines += [f"  {format_param(p)}" for p in m.params.values()]
    lines += [format_function(fn) for fn in m.functions.values()]
    lines.append("}")
    return "\n".join(lines) + "\n"

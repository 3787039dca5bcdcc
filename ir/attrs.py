"""Attribute values and their schema.

An attribute value is one of: bool, int, float, str, a symbolic dim (:class:`Sym`), a dtype,
a list of values, or a dict of values.  Op schemas declare each attribute's kind; coercion both
validates programmatic construction and gives the parser precise errors.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from .dims import Sym
from .dtypes import ALL as DTYPES, DType

_REQUIRED = object()


class AttrError(ValueError):
    pass


@dataclass(frozen=True)
class Attr:
    kind: str                 # bool int float str dim dims ints dtype any
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def coerce(self, name: str, v: Any) -> Any:
        k = self.kind
        if v is None and self.default is None:
            return None
        if k == "any":
            return _freeze(v)
        if k == "bool" and isinstance(v, bool):
            return v
        if k == "int" and isinstance(v, int) and not isinstance(v, bool):
            return v
        if k == "float" and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if k == "str" and isinstance(v, str):
            return v
        if k == "dim" and _is_dim(v):
            return v
        if k in ("dims", "ints") and isinstance(v, (list, tuple)):
            ok = _is_dim if k == "dims" else (lambda x: isinstance(x, int) and not isinstance(x, bool))
            if all(ok(x) for x in v):
                return tuple(v)
        if k == "dtype":
            if isinstance(v, DType):
                return v
            if isinstance(v, Sym) and v.op == "var" and v.args[0] in DTYPES:
                return DTYPES[v.args[0]]
            if isinstance(v, str) and v in DTYPES:
                return DTYPES[v]
        raise AttrError(f"attribute '{name}' expects {k}, got {format_value(v)}")


def _is_dim(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, Sym)


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return {k: _freeze(x) for k, x in v.items()}
    return v


def format_value(v: Any) -> str:
    """The IR text of an attribute value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (Sym, DType)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{format_key(k)} = {format_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        return "none"
    raise AttrError(f"value {v!r} of type {type(v).__name__} cannot be an attribute")


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def format_key(k: str) -> str:
    """An attribute name as the parser reads it: bare if an identifier, else a JSON string."""
    return k if _IDENT.fullmatch(k) else json.dumps(k)

"""Appending nodes to a function with inferred types and unique value names."""
from __future__ import annotations

import re

from .core import Function, Node
from .registry import get_op
from .types import TensorType


class Builder:
    def __init__(self, fn: Function, loc: str | None = None, insert_at: int | None = None):
        self.fn = fn
        self.loc = loc
        self.insert_at = insert_at      # None: append; else insert here and move on
        self._taken = {v.name for v in fn.values()}
        self._counter: dict[str, int] = {}

    def reserve(self, name: str) -> None:
        """Mark a name taken by a value created outside the builder (a new argument)."""
        self._taken.add(name)

    def fresh(self, hint: str) -> str:
        """A value name not yet used in the function, derived from `hint`."""
        base = re.sub(r"[^A-Za-z0-9_.]", "_", hint) or "v"
        name = base
        while name in self._taken:
            self._counter[base] = self._counter.get(base, 0) + 1
            name = f"{base}_{self._counter[base]}"
        self._taken.add(name)
        return name

    def emit(self, op: str, inputs, attrs: dict | None = None, *, name: str | None = None,
             types: list[TensorType] | None = None, loc: str | None = None, index: int | None = None):
        """Create a node (types inferred unless given), insert it, return its output value(s)."""
        opdef = get_op(op)
        opdef.check_arity(len(inputs))
        attrs = opdef.normalize_attrs(dict(attrs or {}))
        if types is None:
            types = opdef.infer([v.type for v in inputs], attrs)
        names = [self.fresh(name or op)] if len(types) == 1 else \
            [self.fresh(f"{name or op}.{i}") for i in range(len(types))]
        node = Node(opdef, inputs, attrs, types, names, loc if loc is not None else self.loc)
        if index is None and self.insert_at is not None:
            index = self.insert_at
            self.insert_at += 1
        if index is None:
            self.fn.nodes.append(node)
        else:
            self.fn.nodes.insert(index, node)
        return node.outputs[0] if len(node.outputs) == 1 else node.outputs

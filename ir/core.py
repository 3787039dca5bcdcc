"""Values, nodes, functions and modules: the IR's data structures.

The IR is SSA: every :class:`Value` is defined once, by a function argument or a node, and nodes
are kept in a valid execution order.  Weights are module-level :class:`Param` values referenced
by name (``@model.layers.0.mlp.up_proj.weight``); their data is loaded lazily so a module for a
large model can be built, printed and transformed without its weights in memory.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .registry import OpDef, get_op
from .types import TensorType


class Value:
    __slots__ = ("name", "type", "producer")

    def __init__(self, name: str, type: TensorType, producer: "Node | None" = None):
        self.name = name
        self.type = type
        self.producer = producer

    @property
    def ref(self) -> str:
        return f"%{self.name}"

    def __repr__(self) -> str:
        return f"{self.ref}: {self.type}"


class Param(Value):
    """A named weight of the module; `load()` returns its data (float or encoded storage).
    `attrs` carry facts about the weight that are not part of its type, such as the error a
    quantization introduced; they are printed with the parameter and never change semantics."""
    __slots__ = ("loader", "digest", "attrs", "_data")

    def __init__(self, name: str, type: TensorType, loader: Callable[[], np.ndarray] | None = None,
                 digest: str | None = None, attrs: dict | None = None):
        super().__init__(name, type)
        self.loader = loader
        self.digest = digest
        self.attrs = dict(attrs or {})
        self._data = None

    @property
    def ref(self) -> str:
        return f"@{self.name}"

    def load(self) -> np.ndarray:
        if self._data is not None:
            return self._data
        if self.loader is None:
            raise LookupError(f"parameter @{self.name} has no data attached")
        arr = self.loader()
        want = self.type.storage_shape()
        if tuple(arr.shape) != want or arr.dtype != self.type.dtype.storage:
            raise ValueError(f"parameter @{self.name}: data is {arr.dtype}{list(arr.shape)},"
                             f" type says {self.type}")
        return arr

    def set_data(self, arr: np.ndarray) -> None:
        """Pin data in memory (small constants, test fixtures)."""
        self._data = np.ascontiguousarray(arr, dtype=self.type.dtype.storage)
        self.loader = lambda: self._data
        self.digest = digest_of(self._data)


def digest_of(arr: np.ndarray) -> str:
    """Short content digest printed beside a parameter: first 16 hex digits of sha256."""
    return hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()[:16]


class Node:
    __slots__ = ("opdef", "inputs", "attrs", "outputs", "loc")

    def __init__(self, op: str | OpDef, inputs: Iterable[Value], attrs: dict | None,
                 output_types: Iterable[TensorType], output_names: Iterable[str], loc: str | None = None):
        self.opdef = get_op(op) if isinstance(op, str) else op
        self.inputs = list(inputs)
        self.opdef.check_arity(len(self.inputs))
        self.attrs = self.opdef.normalize_attrs(dict(attrs or {}))
        self.outputs = [Value(n, t, self) for n, t in zip(output_names, output_types, strict=True)]
        self.loc = loc

    @property
    def op(self) -> str:
        return self.opdef.name

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise ValueError(f"op '{self.op}' has {len(self.outputs)} outputs")
        return self.outputs[0]

    def __repr__(self) -> str:
        from .printer import format_node
        return format_node(self)


class Function:
    def __init__(self, name: str, args: list[Value], nodes: list[Node] | None = None,
                 results: list[Value] | None = None):
        self.name = name
        self.args = args
        self.nodes = nodes or []
        self.results = results or []

    def users(self) -> dict[Value, list[Node]]:
        """Map each value to the nodes that read it (a fresh snapshot)."""
        out: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                out.setdefault(v, []).append(n)
        return out

    def values(self) -> Iterator[Value]:
        yield from self.args
        for n in self.nodes:
            yield from n.outputs


class Module:
    def __init__(self, name: str, attrs: dict[str, Any] | None = None):
        self.name = name
        self.attrs = dict(attrs or {})
        self.params: dict[str, Param] = {}
        self.functions: dict[str, Function] = {}

    def add_param(self, param: Param) -> Param:
        if param.name in self.params:
            raise ValueError(f"parameter @{param.name} is defined twice")
        self.params[param.name] = param
        return param

    def add_function(self, fn: Function) -> Function:
        if fn.name in self.functions:
            raise ValueError(f"function @{fn.name} is defined twice")
        self.functions[fn.name] = fn
        return fn

    @property
    def main(self) -> Function:
        """The entry function: 'forward' if present, else the first one."""
        if "forward" in self.functions:
            return self.functions["forward"]
        return next(iter(self.functions.values()))

    def used_params(self) -> set[str]:
        return {v.name for fn in self.functions.values() for n in fn.nodes
                for v in n.inputs if isinstance(v, Param)}

    def drop_unused_params(self) -> list[str]:
        used = self.used_params()
        dropped = [n for n in self.params if n not in used]
        for n in dropped:
            del self.params[n]
        return dropped

    def param_bytes(self) -> int:
        return sum(p.type.nbytes() for p in self.params.values())

    def __str__(self) -> str:
        from .printer import print_module
        return print_module(self)

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
    quantization introduced; they are printed with the parameter and never change semantics.

    A module sharded for tensor parallelism (the shard-tp pass) gives a split parameter one
    loader per rank (`shards`); its type is one rank's slice, the same on every rank.  Such a
    parameter has no single value: `load(rank)` names the rank, and `load()` is an error."""
    __slots__ = ("loader", "digest", "attrs", "_data", "shards")

    def __init__(self, name: str, type: TensorType, loader: Callable[[], np.ndarray] | None = None,
                 digest: str | None = None, attrs: dict | None = None,
                 shards: list[Callable[[], np.ndarray]] | None = None):
        super().__init__(name, type)
        self.loader = loader
        self.digest = digest
        self.attrs = dict(attrs or {})
        self._data = None
        self.shards = list(shards) if shards is not None else None

    @property
    def ref(self) -> str:
        return f"@{self.name}"

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    def load(self, rank: int | None = None) -> np.ndarray:
        """The data; for a sharded parameter, rank `rank`'s slice (a replicated one ignores it)."""
        if self.shards is not None:
            if rank is None:
                raise LookupError(f"parameter @{self.name} is split {len(self.shards)} ways: load(rank) "
                                  f"names the rank whose slice to read")
            if not 0 <= rank < len(self.shards):
                raise LookupError(f"parameter @{self.name} has {len(self.shards)} shards, not rank {rank}")
            return self._checked(self.shards[rank]())
        if self._data is not None:
            return self._data
        if self.loader is None:
            raise LookupError(f"parameter @{self.name} has no data attached")
        return self._checked(self.loader())

    def _checked(self, arr: np.ndarray) -> np.ndarray:
        want = self.type.storage_shape()
        if tuple(arr.shape) != want or arr.dtype != self.type.dtype.storage:
            raise ValueError(f"parameter @{self.name}: data is {arr.dtype}{list(arr.shape)},"
                             f" type says {self.type}")
        return arr

    def derive(self, name: str, type: TensorType, fn: Callable[[np.ndarray], np.ndarray],
               attrs: dict | None = None) -> "Param":
        """A parameter whose data is fn(this one's data), computed lazily and per shard, so a
        pass that re-encodes weights (quantize, repack) works on sharded modules unchanged."""
        if self.shards is not None:
            shards = [lambda load=load: fn(load()) for load in self.shards]
            return Param(name, type, attrs=attrs, shards=shards)
        return Param(name, type, lambda: fn(self.load()), attrs=attrs)

    def set_data(self, arr: np.ndarray) -> None:
        """Pin data in memory (small constants, test fixtures)."""
        self._data = np.ascontiguousarray(arr, dtype=self.type.dtype.storage)
        self.loader = lambda: self._data
        self.digest = digest_of(self._data)
        self.shards = None


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

"""The op registry: every IR op declares its schema once.

An :class:`OpDef` holds the op's inputs (``"x"``, optional ``"bias?"``, variadic ``"xs*"``),
its attributes with kinds and defaults, a type-inference function, a numpy reference
implementation and flags.  The verifier, the parser and the reference interpreter all read this
one table, so an op is defined in exactly one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .attrs import Attr, AttrError
from .types import TensorType


class TypeInferenceError(ValueError):
    pass


Infer = Callable[[list[TensorType], dict], list[TensorType]]
Reference = Callable[..., Any]


@dataclass
class OpDef:
    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Attr]
    infer: Infer
    reference: Reference
    side_effects: bool = False
    commutative: bool = False
    doc: str = ""

    @property
    def min_inputs(self) -> int:
        return sum(1 for i in self.inputs if not i.endswith(("?", "*")))

    @property
    def max_inputs(self) -> float:
        return float("inf") if any(i.endswith("*") for i in self.inputs) else len(self.inputs)

    def check_arity(self, n: int) -> None:
        if not self.min_inputs <= n <= self.max_inputs:
            want = (f"{self.min_inputs}" if self.min_inputs == self.max_inputs
                    else f"{self.min_inputs} to {self.max_inputs}")
            raise AttrError(f"op '{self.name}' takes {want} inputs ({', '.join(self.inputs)}), got {n}")

    def normalize_attrs(self, attrs: dict) -> dict:
        """Coerce given attributes, fill defaults, reject unknown or missing ones."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise AttrError(f"op '{self.name}' has no attribute '{sorted(unknown)[0]}'"
                            f" (attributes: {', '.join(self.attrs) or 'none'})")
        out = {}
        for name, spec in self.attrs.items():
            if name in attrs:
                out[name] = spec.coerce(name, attrs[name])
            elif spec.required:
                raise AttrError(f"op '{self.name}' needs attribute '{name}'")
            else:
                out[name] = spec.default
        return out


_OPS: dict[str, OpDef] = {}


def register_op(name: str, inputs: Sequence[str] | str, attrs: dict[str, Attr] | None = None, *,
                infer: Infer, side_effects: bool = False, commutative: bool = False):
    """Decorator on the numpy reference implementation of op `name`."""
    if isinstance(inputs, str):
        inputs = tuple(inputs.split())

    def wrap(reference: Reference) -> Reference:
        if name in _OPS:
            raise ValueError(f"op '{name}' is already registered")
        _OPS[name] = OpDef(name, tuple(inputs), dict(attrs or {}), infer, reference,
                           side_effects, commutative, (reference.__doc__ or "").strip())
        return reference
    return wrap


def get_op(name: str) -> OpDef:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown op '{name}'") from None


def has_op(name: str) -> bool:
    return name in _OPS


def all_ops() -> dict[str, OpDef]:
    return dict(_OPS)

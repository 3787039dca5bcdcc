"""The op registry: every IR op declares its schema once.

An :class:`OpDef` holds the op's inputs (``"x"``, optional ``"bias?"``, variadic ``"xs*"``),
its attributes with kinds and defaults, a type-inference function, a numpy reference
implementation and flags.  The verifier, the parser and the reference interpreter all read this
one table, so an op is defined in exactly one place.

Facts other layers need about an op are declared here too, with the op, instead of in tables
keyed by op name in each layer (ir may not import them; they read these fields):

  weights       input positions read as weight matrices [out, in], which quantize-nf4 may
                replace by nf4 parameters (``(1,)`` for linear)
  weight_input  ``(position, *inputs, **attrs, types) -> array``: the activation the weight at
                `position` multiplies, computed from the op's inputs (calibration; default:
                the first input)
  weight_output ``(activation, *inputs, **attrs, types) -> result``: the op's result from the
                activation of its last weight (an op whose result is that weight's product), so
                a calibration run that computed the activation does not compute it twice
  nf4_variant   the op a node becomes when its weights turn nf4 (linear -> linear_nf4); ops
                without one take float or nf4 weights alike
  q8_variant    likewise for q8 weights (linear -> linear_q8)
  kind          the fusion the op stands for, counted per layer by the fusion report
                ("attention", "norm", "rope", "mlp")
  native        how native code covers the op (:class:`Native`), None where it does not
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .attrs import Attr, AttrError
from .types import TensorType


class TypeInferenceError(ValueError):
    pass


Infer = Callable[[list[TensorType], dict], list[TensorType]]
Reference = Callable[..., Any]
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Native:
    """How the native backend covers an op, written ``"kernel"``, ``"linear"``, ``"alias"``,
    ``"unary:Silu"`` or ``"binary:Add"`` in register_op.

    kernel   the code generator has an emitter for the op (its `op_<name>`)
    linear   the same, for an op made of matrix products: its result can absorb a residual
             `add` as the kernels' epilogue, and the int8 quantization of its input is shared
             with the other linear readers of that input
    alias    no code: the result is the input's bytes under another shape (reshape)
    unary    amxc::unary<amxc::FUNCTOR> over all elements
    binary   amxc::binary<amxc::FUNCTOR> with numpy broadcasting
    """
    form: str
    functor: str = ""

    FORMS = ("kernel", "linear", "alias", "unary", "binary")

    @classmethod
    def parse(cls, spec: str) -> "Native":
        form, _, functor = spec.partition(":")
        if form not in cls.FORMS or bool(functor) != (form in ("unary", "binary")) or \
                (functor and not _IDENT.fullmatch(functor)):
            raise ValueError(f"native={spec!r}: expected kernel, linear, alias, unary:FUNCTOR or "
                             f"binary:FUNCTOR")
        return cls(form, functor)

    def __str__(self) -> str:
        return f"{self.form}:{self.functor}" if self.functor else self.form


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
    weights: tuple[int, ...] = ()
    weight_input: Callable[..., Any] | None = None
    nf4_variant: str | None = None
    kind: str | None = None
    native: Native | None = None
    q8_variant: str | None = None
    weight_output: Callable[..., Any] | None = None

    def variant_for(self, dtype_name: str) -> str | None:
        """The op a node becomes when its weights turn `dtype_name` (nf4, q8), if another."""
        return {"nf4": self.nf4_variant, "q8": self.q8_variant}.get(dtype_name)

    def activation_of(self, position: int, inputs: list, attrs: dict, types: list) -> Any:
        """The array the weight at input `position` multiplies, given the op's input arrays."""
        if position not in self.weights:
            raise ValueError(f"op '{self.name}' reads no weight at input {position}")
        if self.weight_input is None:
            return inputs[0]
        return self.weight_input(position, *inputs, **attrs, types=types)

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
                infer: Infer, side_effects: bool = False, commutative: bool = False,
                weights: Sequence[int] = (), weight_input: Callable[..., Any] | None = None,
                nf4_variant: str | None = None, kind: str | None = None, native: str | None = None,
                q8_variant: str | None = None, weight_output: Callable[..., Any] | None = None):
    """Decorator on the numpy reference implementation of op `name`; the keyword facts are
    described in the module docstring."""
    if isinstance(inputs, str):
        inputs = tuple(inputs.split())
    if any(not 0 <= i < len(inputs) or inputs[i].endswith("*") for i in weights):
        raise ValueError(f"op '{name}': weights={tuple(weights)} are not positions of its inputs {inputs}")
    if (weight_input or nf4_variant or q8_variant) and not weights:
        raise ValueError(f"op '{name}': weight_input, nf4_variant and q8_variant need weights=")
    if weight_output and not weight_input:
        raise ValueError(f"op '{name}': weight_output needs weight_input=")

    def wrap(reference: Reference) -> Reference:
        if name in _OPS:
            raise ValueError(f"op '{name}' is already registered")
        _OPS[name] = OpDef(name, tuple(inputs), dict(attrs or {}), infer, reference,
                           side_effects, commutative, (reference.__doc__ or "").strip(),
                           tuple(weights), weight_input, nf4_variant, kind,
                           Native.parse(native) if native is not None else None, q8_variant,
                           weight_output)
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


def float_variant(name: str) -> str | None:
    """The op whose `nf4_variant` or `q8_variant` is `name` (linear_nf4 -> linear), if any."""
    return next((op.name for op in _OPS.values() if name in (op.nf4_variant, op.q8_variant)), None)

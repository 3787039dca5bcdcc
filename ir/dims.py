"""Symbolic dimensions.

A dimension is a plain ``int`` or a :class:`Sym`: a small expression over named sizes such as
``b`` (batch) and ``s`` (sequence), built from ``+ - * //``.  Exporters emit such arithmetic
(``s*8``, ``s+1``); keeping it as an expression rather than as IR nodes lets every type be read
and checked on its own.  A ``Sym`` prints canonically, so two equal expressions print the same
text and the text form round-trips.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

Dim = Union[int, "Sym"]

# binding strength of each operator, for printing with the fewest parentheses
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "//": 2, "var": 9}


class DimError(ValueError):
    pass


@dataclass(frozen=True)
class Sym:
    op: str       # "var", "+", "-", "*" or "//"
    args: tuple   # (name,) for "var", else (lhs, rhs) where each is a Dim

    @staticmethod
    def var(name: str) -> "Sym":
        return Sym("var", (name,))

    def __str__(self) -> str:
        if self.op == "var":
            return self.args[0]
        lhs, rhs = self.args
        prec = _PRECEDENCE[self.op]
        # left-associative: the right operand needs parentheses at equal precedence
        return f"{_wrap(lhs, prec, False)}{self.op}{_wrap(rhs, prec, True)}"

    def __repr__(self) -> str:
        return f"Sym({self})"

    def symbols(self) -> set[str]:
        if self.op == "var":
            return {self.args[0]}
        return set().union(*(a.symbols() for a in self.args if isinstance(a, Sym)))

    def evaluate(self, env: Mapping[str, int]) -> int:
        if self.op == "var":
            try:
                return env[self.args[0]]
            except KeyError:
                raise DimError(f"size '{self.args[0]}' is not bound") from None
        lhs, rhs = (evaluate(a, env) for a in self.args)
        if self.op == "+":
            return lhs + rhs
        if self.op == "-":
            return lhs - rhs
        if self.op == "*":
            return lhs * rhs
        if rhs == 0:
            raise DimError(f"division by zero in '{self}'")
        return lhs // rhs


def _wrap(d: Dim, prec: int, right: bool) -> str:
    text = str(d)
    if isinstance(d, Sym) and (_PRECEDENCE[d.op] < prec or (right and _PRECEDENCE[d.op] == prec)):
        return f"({text})"
    if isinstance(d, int) and d < 0:
        return f"({text})"
    return text


def binary(op: str, lhs: Dim, rhs: Dim) -> Dim:
    """Build ``lhs op rhs`` in canonical form: a polynomial in the sizes with integer
    coefficients (so ``s+s`` and ``2*s`` are the same dim); an inexact ``//`` stays opaque."""
    if isinstance(lhs, int) and isinstance(rhs, int):
        if op == "//" and rhs == 0:
            raise DimError("division by zero")
        return {"+": lhs + rhs, "-": lhs - rhs, "*": lhs * rhs, "//": lhs // rhs if rhs else 0}[op]
    a, b = _Poly.of(lhs), _Poly.of(rhs)
    if op == "+":
        return a.add(b, 1).to_dim()
    if op == "-":
        return a.add(b, -1).to_dim()
    if op == "*":
        return a.mul(b).to_dim()
    if b.is_const() and b.const() != 0 and all(c % b.const() == 0 for c in a.terms.values()):
        return _Poly({m: c // b.const() for m, c in a.terms.items()}, a.atoms).to_dim()
    if b.is_const() and b.const() == 0:
        raise DimError("division by zero")
    return Sym("//", (a.to_dim(), b.to_dim()))


def canonical(d: Dim) -> Dim:
    return d if isinstance(d, int) else _Poly.of(d).to_dim()


class _Poly:
    """Sum of coefficient * product-of-atoms; atoms are size names or opaque floor divisions."""

    def __init__(self, terms: dict, atoms: dict):
        self.terms = {m: c for m, c in terms.items() if c}
        self.atoms = atoms     # atom text -> Sym

    @staticmethod
    def of(d: Dim) -> "_Poly":
        if isinstance(d, int):
            return _Poly({(): d}, {})
        if d.op == "var" or d.op == "//":
            key = str(d)
            return _Poly({(key,): 1}, {key: d})
        a, b = _Poly.of(d.args[0]), _Poly.of(d.args[1])
        return a.add(b, 1) if d.op == "+" else a.add(b, -1) if d.op == "-" else a.mul(b)

    def add(self, other: "_Poly", sign: int) -> "_Poly":
        terms = dict(self.terms)
        for m, c in other.terms.items():
            terms[m] = terms.get(m, 0) + sign * c
        return _Poly(terms, {**self.atoms, **other.atoms})

    def mul(self, other: "_Poly") -> "_Poly":
        terms: dict = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in other.terms.items():
                m = tuple(sorted(m1 + m2))
                terms[m] = terms.get(m, 0) + c1 * c2
        return _Poly(terms, {**self.atoms, **other.atoms})

    def is_const(self) -> bool:
        return all(m == () for m in self.terms)

    def const(self) -> int:
        return self.terms.get((), 0)

    def to_dim(self) -> Dim:
        if self.is_const():
            return self.const()
        order = sorted(self.terms, key=lambda m: (self.terms[m] < 0, m == (), -len(m), m))
        out: Dim | None = None
        for m in order:
            c = self.terms[m]
            mag = abs(c) if out is not None else c
            term: Dim | None = None if mag == 1 and m else mag
            for atom in m:
                term = self.atoms[atom] if term is None else Sym("*", (term, self.atoms[atom]))
            if out is None:
                out = term
            else:
                out = Sym("-" if c < 0 else "+", (out, term))
        return out


def substitute(d: Dim, env: Mapping[str, Dim]) -> Dim:
    """d with the named sizes replaced (by ints or other dims), in canonical form."""
    if isinstance(d, int):
        return d
    if d.op == "var":
        return env.get(d.args[0], d)
    return binary(d.op, substitute(d.args[0], env), substitute(d.args[1], env))


def evaluate(d: Dim, env: Mapping[str, int]) -> int:
    return d if isinstance(d, int) else d.evaluate(env)


def symbols(d: Dim) -> set[str]:
    return set() if isinstance(d, int) else d.symbols()


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _monomial(d: Dim):
    """(coefficient, sorted symbol names) if d is a product of ints and names, else None."""
    if isinstance(d, int):
        return d, ()
    if d.op == "var":
        return 1, (d.args[0],)
    if d.op == "*":
        parts = [_monomial(a) for a in d.args]
        if None in parts:
            return None
        return parts[0][0] * parts[1][0], tuple(sorted(parts[0][1] + parts[1][1]))
    return None


def same_numel(a, b) -> bool | None:
    """Whether two shapes hold the same number of elements: True/False, or None if unknowable."""
    coef_a, coef_b, names_a, names_b = 1, 1, [], []
    for dims, names, which in ((a, names_a, 0), (b, names_b, 1)):
        for d in dims:
            m = _monomial(d)
            if m is None:
                return None
            if which == 0:
                coef_a *= m[0]
            else:
                coef_b *= m[0]
            names.extend(m[1])
    if sorted(names_a) == sorted(names_b):
        return coef_a == coef_b
    return None

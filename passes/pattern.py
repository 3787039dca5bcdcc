"""Declarative rewrite rules over the IR (tinygrad / TVM-DFPattern style).

A pattern is a small tree:

    P.op("mul", P.var("w"), P.op("mul", P.var("x"), P.op("rsqrt", ...)))

`P.op` takes one op name or a tuple of alternatives.  `P.var(name)` matches any value and binds it; the same name twice must be the same value.
`P.const(name)` matches a scalar `constant` node and binds its value; `P.param(name)` a module
parameter.  `P.op` matches a node by op name, optionally by attributes (exact values or
predicates), tries both operand orders of commutative ops, and with `one_use=True` refuses a
node whose result is also read elsewhere (fusing it would duplicate work).  `where=` states extra
constraints on the whole match.  A `Rule` pairs a pattern with a function that builds the
replacement; `rewrite(fn, rules)` applies rules until nothing matches and cleans up dead nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from amxc.ir import Builder, Function, Module, Node, Param, Value

from .base import Pass


class Match(dict):
    """Bindings of a successful match: values by var name, constants by const name, and the
    matched nodes under the pattern's `name=` labels."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


@dataclass
class Pattern:
    def match(self, v: Value, m: Match, users) -> bool:
        raise NotImplementedError


def _bind(m: Match, name: str, value, same) -> bool:
    """Bind `name`, or, if already bound, require the same binding."""
    if name in m:
        return same(m[name], value)
    m[name] = value
    return True


@dataclass
class VarPat(Pattern):
    name: str
    check: Callable[[Value], bool] | None = None

    def match(self, v, m, users):
        if self.check is not None and not self.check(v):
            return False
        return _bind(m, self.name, v, lambda a, b: a is b)


class ParamPat(VarPat):
    def __init__(self, name: str):
        super().__init__(name, lambda v: isinstance(v, Param))


@dataclass
class ConstPat(Pattern):
    name: str
    check: Callable[[Any], bool] | None = None

    def match(self, v, m, users):
        n = v.producer
        if n is None or n.op != "constant":
            return False
        value = n.attrs["value"]
        if self.check is not None and not self.check(value):
            return False
        return _bind(m, self.name, value, lambda a, b: a == b)


@dataclass
class OpPat(Pattern):
    op: str | tuple[str, ...]          # one op name, or alternatives ("linear", "linear_nf4")
    inputs: tuple
    attrs: dict = field(default_factory=dict)
    one_use: bool = False
    name: str | None = None

    def match(self, v, m, users):
        n = v.producer
        if n is None or len(n.inputs) != len(self.inputs):
            return False
        if n.op != self.op if isinstance(self.op, str) else n.op not in self.op:
            return False
        if len(n.outputs) != 1 and n.outputs.index(v) != 0:
            return False
        if self.one_use and len(users.get(v, ())) > 1:
            return False
        for key, want in self.attrs.items():
            have = n.attrs.get(key)
            if not (want(have) if callable(want) else have == want):
                return False
        orders = [self.inputs]
        if n.opdef.commutative and len(self.inputs) == 2:
            orders.append(self.inputs[::-1])
        for order in orders:
            trial = Match(m)
            if all(p.match(x, trial, users) for p, x in zip(order, n.inputs)):
                if self.name:
                    trial[self.name] = n
                m.clear()
                m.update(trial)
                return True
        return False


class P:
    """Pattern constructors (a namespace, so rule tables read compactly)."""
    var = VarPat
    const = ConstPat
    param = ParamPat

    @staticmethod
    def op(op: str | tuple[str, ...], *inputs: Pattern, one_use: bool = False, name: str | None = None,
           **attrs) -> OpPat:
        return OpPat(op, tuple(inputs), attrs, one_use, name)


@dataclass
class Rule:
    """pattern -> build(match, builder) returning the replacement value (or None to decline)."""
    name: str
    pattern: Pattern
    build: Callable[[Match, Builder], Value | None]
    where: Callable[[Match], bool | str] = lambda m: True


def match(pattern: Pattern, v: Value, users) -> Match | None:
    m = Match()
    return m if pattern.match(v, m, users) else None


def replace_uses(fn: Function, old: Value, new: Value) -> None:
    for n in fn.nodes:
        if any(x is old for x in n.inputs):
            n.inputs = [new if x is old else x for x in n.inputs]
    fn.results = [new if x is old else x for x in fn.results]


def remove_dead(fn: Function) -> int:
    """Drop nodes none of whose results are used (side-effecting ops stay)."""
    live = {id(v) for v in fn.results}
    kept = []
    for n in reversed(fn.nodes):
        if n.opdef.side_effects or any(id(o) in live for o in n.outputs):
            kept.append(n)
            live.update(id(v) for v in n.inputs)
    removed = len(fn.nodes) - len(kept)
    fn.nodes = kept[::-1]
    return removed


@dataclass
class RewriteLog:
    fired: list[tuple[str, Node]] = field(default_factory=list)
    rejected: list[tuple[str, Node, str]] = field(default_factory=list)


def rewrite(fn: Function, rules: Iterable[Rule], log: RewriteLog | None = None) -> bool:
    """Apply rules to every node (first match wins) until a fixpoint; True if anything changed.

    A replacement is inserted right before the matched root, so it sees every value the root
    saw; the root's uses move to it and the now-dead pattern nodes are removed."""
    rules = list(rules)
    changed = False
    while True:
        users = fn.users()
        for v in fn.results:              # being returned is a use too
            users.setdefault(v, []).append(None)
        fired = False
        for i, node in enumerate(fn.nodes):
            if len(node.outputs) != 1:
                continue
            root = node.outputs[0]
            for rule in rules:
                m = match(rule.pattern, root, users)
                if m is None:
                    continue
                verdict = rule.where(m)
                if verdict is not True:
                    if log is not None:
                        log.rejected.append((rule.name, node, verdict or "constraint failed"))
                    continue
                b = Builder(fn, loc=node.loc, insert_at=i)
                new = rule.build(m, b)
                if new is None:
                    continue
                replace_uses(fn, root, new)
                if log is not None:
                    log.fired.append((rule.name, node))
                fired = changed = True
                break
            if fired:
                break
        if not fired:
            break
        remove_dead(fn)
    return changed


class RewritePass(Pass):
    """A pass that is a table of rules; keeps the log of what fired and what was rejected
    (the fusion report reads it)."""
    rules: list[Rule] = []

    def run(self, module: Module) -> bool:
        self.log = RewriteLog()
        return any([rewrite(fn, self.rules, self.log) for fn in module.functions.values()])

"""Parser for the IR text form (see printer.py for the canonical spelling).

Hand-written lexer and recursive-descent parser.  Every failure, syntactic or semantic (unknown op,
undefined value, bad attribute), is a :class:`ParseError` with line and column; nothing else
escapes for any input text.
"""
from __future__ import annotations

import json
import re
from typing import Any

from . import dims as D
from .attrs import AttrError
from .core import Function, Module, Node, Param, Value
from .dtypes import ALL as DTYPES
from .errors import ParseError
from .registry import get_op, has_op
from .types import KVCacheType, TensorType

_MAX_DEPTH = 64

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r\n]+|\#[^\n]*)
  | (?P<value>%[A-Za-z0-9_.$]+)
  | (?P<symbol>@[A-Za-z0-9_.$-]+)
  | (?P<float>(?:\d+\.\d*(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+))
  | (?P<int>\d+)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>")
  | (?P<punct>->|//|[()\[\]{},:=+\-*<>])
""", re.VERBOSE)


_STRING_RUN = re.compile(r'[^"\\\n]*')
_STRING_ESCAPE = re.compile(r'\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})')
MAX_STRING = 1 << 20        # characters; locations and paths are short, and a regex over an
                            # escape-heavy megabyte string would hold a backtracking frame per escape


def _string_end(source: str, start: int) -> int | str:
    """The index after the closing quote of the JSON-style string opened at `start`, scanned
    in linear time and memory, or what is wrong with it."""
    pos = start + 1
    while True:
        pos = _STRING_RUN.match(source, pos).end()
        if pos - start > MAX_STRING:
            return f"a string literal longer than {MAX_STRING} characters"
        if pos >= len(source) or source[pos] == "\n":
            return "unterminated string literal"
        if source[pos] == '"':
            return pos + 1
        m = _STRING_ESCAPE.match(source, pos)
        if m is None:
            return f"invalid escape {source[pos:pos + 2]!r} in a string literal"
        pos = m.end()


class Token:
    __slots__ = ("kind", "text", "line", "col")

    def __init__(self, kind, text, line, col):
        self.kind, self.text, self.line, self.col = kind, text, line, col

    def __repr__(self):
        return f"{self.kind}:{self.text!r}@{self.line}:{self.col}"


def tokenize(source: str, filename: str = "<ir>") -> list[Token]:
    tokens, pos, line, line_start = [], 0, 1, 0
    while pos < len(source):
        m = _TOKEN.match(source, pos)
        if m is None:
            raise ParseError(f"unexpected character {source[pos]!r}", line, pos - line_start + 1,
                             source, filename)
        kind, text = m.lastgroup, m.group()
        if kind == "string":
            end = _string_end(source, pos)
            if isinstance(end, str):
                raise ParseError(end, line, pos - line_start + 1, source, filename)
            text = source[pos:end]
        if kind != "ws":
            tokens.append(Token(kind, text, line, pos - line_start + 1))
        newlines = text.count("\n")
        if newlines:
            line += newlines
            line_start = pos + text.rindex("\n") + 1
        pos += len(text)
    tokens.append(Token("eof", "", line, pos - line_start + 1))
    return tokens


class _Depth:
    """`with parser.nested():` counts nesting, so hostile text cannot recurse without bound."""
    __slots__ = ("parser",)

    def __init__(self, parser):
        self.parser = parser

    def __enter__(self):
        self.parser.depth += 1
        if self.parser.depth > _MAX_DEPTH:
            raise self.parser.error(f"nesting deeper than {_MAX_DEPTH} levels")

    def __exit__(self, *exc):
        self.parser.depth -= 1


class _Parser:
    def __init__(self, source: str, filename: str):
        self.source, self.filename = source, filename
        self.toks = tokenize(source, filename)
        self.i = 0
        self.depth = 0

    # -- token helpers -------------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def error(self, msg: str, tok: Token | None = None) -> ParseError:
        tok = tok or self.tok
        return ParseError(msg, tok.line, tok.col, self.source, self.filename)

    def describe(self, tok: Token) -> str:
        return "end of input" if tok.kind == "eof" else repr(tok.text)

    def next(self) -> Token:
        tok = self.tok
        if tok.kind != "eof":
            self.i += 1
        return tok

    def at(self, text: str) -> bool:
        return self.tok.text == text and self.tok.kind in ("punct", "ident")

    def accept(self, text: str) -> bool:
        if self.at(text):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> Token:
        if not self.at(text):
            raise self.error(f"expected '{text}' but found {self.describe(self.tok)}")
        return self.next()

    def expect_kind(self, kind: str, what: str) -> Token:
        if self.tok.kind != kind:
            raise self.error(f"expected {what} but found {self.describe(self.tok)}")
        return self.next()

    def nested(self) -> "_Depth":
        return _Depth(self)

    # -- values --------------------------------------------------------------------------------
    def value(self) -> Any:
        with self.nested():
            tok = self.tok
            if tok.kind == "string":
                self.next()
                return json.loads(tok.text)
            if tok.kind == "ident" and tok.text in ("true", "false", "none"):
                self.next()
                return {"true": True, "false": False, "none": None}[tok.text]
            if self.accept("["):
                items = []
                if not self.accept("]"):
                    items.append(self.value())
                    while self.accept(","):
                        items.append(self.value())
                    self.expect("]")
                return items
            if self.at("{"):
                return self.attr_dict()[0]
            return self.expr()

    def expr(self):
        """Dim arithmetic or a number; a float may only stand alone."""
        with self.nested():
            start = self.tok
            lhs = self.term()
            while self.tok.text in ("+", "-") and self.tok.kind == "punct":
                op = self.next().text
                lhs = self.combine(op, lhs, self.term(), start)
            return lhs

    def term(self):
        with self.nested():
            start = self.tok
            lhs = self.unary()
            while self.tok.text in ("*", "//") and self.tok.kind == "punct":
                op = self.next().text
                lhs = self.combine(op, lhs, self.unary(), start)
            return lhs

    def unary(self):
        with self.nested():
            if self.accept("-"):
                start = self.tok
                v = self.unary()
                if isinstance(v, (int, float)):
                    return -v
                return self.combine("-", 0, v, start)
            return self.atom()

    def atom(self):
        tok = self.next()
        if tok.kind == "int":
            try:
                return int(tok.text)
            except ValueError:
                raise self.error("integer literal too long", tok) from None
        if tok.kind == "float":
            return float(tok.text)
        if tok.kind == "ident":
            if tok.text in ("inf", "nan"):
                return float(tok.text)
            return D.Sym.var(tok.text)
        if tok.text == "(" and tok.kind == "punct":
            v = self.expr()
            self.expect(")")
            return v
        raise self.error(f"expected a value but found {self.describe(tok)}", tok)

    def combine(self, op, lhs, rhs, tok):
        for v in (lhs, rhs):
            if isinstance(v, float) or isinstance(v, bool):
                raise self.error("arithmetic is only allowed on integer sizes", tok)
        if op == "//" and rhs == 0:
            raise self.error("division by zero", tok)
        return D.binary(op, lhs, rhs)

    def attr_dict(self) -> tuple[dict, dict]:
        """`{key = value, ...}` -> (values by key, key tokens by key)."""
        with self.nested():
            self.expect("{")
            out: dict[str, Any] = {}
            toks: dict[str, Token] = {}
            if not self.accept("}"):
                while True:
                    key_tok = self.tok
                    if key_tok.kind == "string":
                        key = json.loads(self.next().text)
                    else:
                        key = self.expect_kind("ident", "an attribute name").text
                    if key in out:
                        raise self.error(f"attribute '{key}' given twice", key_tok)
                    self.expect("=")
                    out[key] = self.value()
                    toks[key] = key_tok
                    if not self.accept(","):
                        break
                self.expect("}")
            return out, toks

    # -- types ---------------------------------------------------------------------------------
    def type(self):
        tok = self.expect_kind("ident", "a type")
        if tok.text == "kv_cache":
            return self.kv_cache_type(tok)
        if tok.text not in DTYPES:
            raise self.error(f"unknown dtype '{tok.text}'", tok)
        self.expect("[")
        shape = []
        if not self.accept("]"):
            while True:
                dim_tok = self.tok
                d = self.expr()
                if not isinstance(d, (int, D.Sym)) or isinstance(d, bool) or (isinstance(d, int) and d < 0):
                    raise self.error("a dimension must be a non-negative integer or a size expression",
                                     dim_tok)
                shape.append(d)
                if not self.accept(","):
                    break
            self.expect("]")
        encoding = self.attr_dict()[0] if self.at("{") else {}
        # a bare name in an encoding (scale=fp8_e4m3) is a string, as the printer writes it
        encoding = {k: v.args[0] if isinstance(v, D.Sym) and v.op == "var" else v for k, v in encoding.items()}
        return TensorType(DTYPES[tok.text], tuple(shape), encoding)

    def kv_cache_type(self, tok: Token) -> KVCacheType:
        self.expect("<")
        fields: dict[str, Any] = {}
        while True:
            key = self.expect_kind("ident", "a kv_cache field").text
            self.expect("=")
            fields[key] = self.next()
            if not self.accept(","):
                break
        self.expect(">")
        want = ("layers", "kv_heads", "head_dim", "dtype")
        state, storage = 0, "f32"
        if tuple(fields)[-1:] == ("storage",):
            storage = fields.pop("storage").text
        if tuple(fields)[-1:] == ("state",):
            t = fields.pop("state")
            if t.kind != "int" or len(t.text) > 9:
                raise self.error("kv_cache state must be a non-negative integer", t)
            state = int(t.text)
        if tuple(fields) != want:
            raise self.error(f"kv_cache needs the fields {', '.join(want)} in that order (then state=N, "
                             f"storage=f32|f16|i8)", tok)
        ints = []
        for key in want[:3]:
            t = fields[key]
            if t.kind != "int" or len(t.text) > 9 or int(t.text) < 1:
                raise self.error(f"kv_cache {key} must be a positive integer", t)
            ints.append(int(t.text))
        if fields["dtype"].text not in DTYPES:
            raise self.error(f"unknown dtype '{fields['dtype'].text}'", fields["dtype"])
        try:
            return KVCacheType(*ints, DTYPES[fields["dtype"].text], state, storage)
        except ValueError as e:
            raise self.error(f"kv_cache: {e}", tok) from None

    # -- structure -----------------------------------------------------------------------------
    def module(self) -> Module:
        self.expect("module")
        name = self.expect_kind("symbol", "a module name like @model").text[1:]
        attrs = self.attr_dict()[0] if self.accept("attributes") else {}
        m = Module(name, attrs)
        self.expect("{")
        while not self.accept("}"):
            if self.at("param"):
                self.param(m)
            elif self.at("func"):
                self.function(m)
            else:
                raise self.error(f"expected 'param', 'func' or '}}' but found {self.describe(self.tok)}")
        if self.tok.kind != "eof":
            raise self.error(f"unexpected {self.describe(self.tok)} after the module")
        return m

    def param(self, m: Module):
        self.expect("param")
        tok = self.expect_kind("symbol", "a parameter name like @w")
        if tok.text[1:] in m.params:
            raise self.error(f"parameter {tok.text} is defined twice", tok)
        self.expect(":")
        type_tok = self.tok
        t = self.type()
        if t.is_quantized:
            try:
                t.quant_layout()
            except ValueError as e:
                raise self.error(str(e), type_tok) from None
        digest = None
        if self.accept("digest"):
            self.expect("(")
            digest = json.loads(self.expect_kind("string", "a digest string").text)
            self.expect(")")
        attrs = self.attr_dict()[0] if self.accept("attributes") else {}
        m.add_param(Param(tok.text[1:], t, digest=digest, attrs=attrs))

    def function(self, m: Module):
        self.expect("func")
        name_tok = self.expect_kind("symbol", "a function name like @forward")
        if name_tok.text[1:] in m.functions:
            raise self.error(f"function {name_tok.text} is defined twice", name_tok)
        scope: dict[str, Value] = {}
        args = []
        self.expect("(")
        if not self.accept(")"):
            while True:
                tok = self.expect_kind("value", "an argument like %x")
                self.expect(":")
                v = Value(tok.text[1:], self.type())
                self.define(scope, v, tok)
                args.append(v)
                if not self.accept(","):
                    break
            self.expect(")")
        self.expect("->")
        self.expect("(")
        result_types = []
        if not self.accept(")"):
            result_types.append(self.type())
            while self.accept(","):
                result_types.append(self.type())
            self.expect(")")
        fn = Function(name_tok.text[1:], args)
        self.expect("{")
        while not self.at("return"):
            fn.nodes.append(self.node(m, scope))
        ret_tok = self.expect("return")
        if self.tok.kind == "value":
            fn.results.append(self.use(m, scope, self.next()))
            while self.accept(","):
                fn.results.append(self.use(m, scope, self.expect_kind("value", "a value")))
        if [v.type for v in fn.results] != result_types:
            raise self.error("returned types do not match the signature of "
                             f"{name_tok.text}", ret_tok)
        self.expect("}")
        m.add_function(fn)

    def define(self, scope, v: Value, tok: Token):
        if v.name in scope:
            raise self.error(f"value %{v.name} is defined twice", tok)
        scope[v.name] = v

    def use(self, m: Module, scope, tok: Token) -> Value:
        name = tok.text[1:]
        if tok.kind == "symbol":
            if name not in m.params:
                raise self.error(f"unknown parameter {tok.text}", tok)
            return m.params[name]
        if name not in scope:
            raise self.error(f"use of undefined value {tok.text}", tok)
        return scope[name]

    def node(self, m: Module, scope) -> Node:
        lhs = [self.expect_kind("value", "a statement like %x = op(...) or 'return'")]
        while self.accept(","):
            lhs.append(self.expect_kind("value", "a result name"))
        self.expect("=")
        op_tok = self.expect_kind("ident", "an op name")
        if not has_op(op_tok.text):
            raise self.error(f"unknown op '{op_tok.text}'", op_tok)
        self.expect("(")
        inputs = []
        if not self.accept(")"):
            while True:
                tok = self.next()
                if tok.kind not in ("value", "symbol"):
                    raise self.error(f"expected an operand like %x or @w but found {self.describe(tok)}",
                                     tok)
                inputs.append(self.use(m, scope, tok))
                if not self.accept(","):
                    break
            self.expect(")")
        raw_attrs, key_toks = self.attr_dict() if self.at("{") else ({}, {})
        self.expect(":")
        types = [self.type()]
        while self.accept(","):
            types.append(self.type())
        if len(types) != len(lhs):
            raise self.error(f"{len(lhs)} results but {len(types)} types", op_tok)
        loc = None
        if self.accept("loc"):
            self.expect("(")
            loc = json.loads(self.expect_kind("string", "a location string").text)
            self.expect(")")
        opdef = get_op(op_tok.text)
        try:
            opdef.check_arity(len(inputs))
        except AttrError as e:
            raise self.error(str(e), op_tok) from None
        attrs = {}
        for key, val in raw_attrs.items():
            key_tok = key_toks[key]
            if key not in opdef.attrs:
                raise self.error(f"op '{opdef.name}' has no attribute '{key}'"
                                 f" (attributes: {', '.join(opdef.attrs) or 'none'})", key_tok)
            try:
                attrs[key] = opdef.attrs[key].coerce(key, val)
            except AttrError as e:
                raise self.error(str(e), key_tok) from None
        try:
            node = Node(opdef, inputs, attrs, types, [t.text[1:] for t in lhs], loc)
        except AttrError as e:
            raise self.error(str(e), op_tok) from None
        for tok, v in zip(lhs, node.outputs):
            self.define(scope, v, tok)
        return node


def parse_module(source: str, filename: str = "<ir>") -> Module:
    """Parse IR text into a Module; raises ParseError (with line:col) on any malformed input."""
    try:
        return _Parser(source, filename).module()
    except RecursionError:
        raise ParseError("input nests too deeply", 1, 1, None, filename) from None

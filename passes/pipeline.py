"""Pipeline strings, MLIR style: the text form of a list of configured passes.

    fuse-attention, quantize-nf4{block=64, double_quant=true}, shard-tp{ways=4}

A pipeline is written by users (`--pipeline`), stored in every artifact's manifest and compared
in tests, so it has one canonical spelling: `format_pipeline` prints each pass as `Pass.spec()`
does (no spaces, options at their defaults left out) and `parse_pipeline` reads that spelling
and any variation in whitespace back.  A string option that holds `,{}"`, surrounding spaces or
nothing at all is written as a JSON string literal (`name{path="a,b"}`).

Errors say at which column the text goes wrong and what was expected there, because a pipeline
is typed on a command line where nothing else points at the mistake.
"""
from __future__ import annotations

import difflib
import json
import re
from typing import Any, Iterable

from .base import Pass, PassError, PassRegistry, current_registry

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SPACE = re.compile(r"\s*")
_RAW_VALUE = re.compile(r"[^,{}]*")


def parse_pipeline(text: str, registry: PassRegistry | None = None) -> list[Pass]:
    """The passes of `text`, configured, looked up in `registry` (default: the current scope).
    An empty or blank text is the empty pipeline."""
    return _Reader(text, registry or current_registry()).pipeline()


def format_pipeline(passes: Iterable[Pass]) -> str:
    """The canonical pipeline string of `passes`."""
    return ",".join(p.spec() for p in passes)


class _Reader:
    """A cursor over the pipeline text; every error carries the 1-based column it stopped at."""

    def __init__(self, text: str, registry: PassRegistry):
        self.text, self.registry, self.pos = text, registry, 0
        self.open_brace: int | None = None      # position of the '{' being read, if any

    def error(self, msg: str, pos: int | None = None) -> PassError:
        return PassError(f"pipeline column {(self.pos if pos is None else pos) + 1}: {msg}")

    def skip_space(self) -> None:
        self.pos = _SPACE.match(self.text, self.pos).end()

    def peek(self) -> str:
        return self.text[self.pos:self.pos + 1]

    def found(self) -> str:
        if self.peek():
            return f"'{self.peek()}'"
        if self.open_brace is not None:
            return f"the end (unbalanced braces: the '{{' at column {self.open_brace + 1} is never closed)"
        return "the end"

    def pipeline(self) -> list[Pass]:
        passes: list[Pass] = []
        self.skip_space()
        if not self.peek():
            return passes
        while True:
            passes.append(self.entry())
            self.skip_space()
            if not self.peek():
                return passes
            if self.peek() == "}":
                raise self.error("unbalanced braces: '}' without a matching '{'")
            if self.peek() != ",":
                raise self.error(f"expected ',' between passes, found {self.found()}")
            self.pos += 1
            self.skip_space()

    def entry(self) -> Pass:
        start = self.pos
        name = self.name("a pass name")
        cls = self.registry.lookup(name)
        if cls is None:
            raise self.error(f"unknown pass '{name}'{_suggest(name, self.registry.names())}", start)
        self.skip_space()
        opts = self.options(cls) if self.peek() == "{" else {}
        try:
            return cls(**opts)
        except PassError as e:     # a pass's own check of its option combination
            raise self.error(str(e), start) from None

    def name(self, what: str) -> str:
        m = _NAME.match(self.text, self.pos)
        if m is None:
            raise self.error(f"expected {what}, found {self.found()}")
        self.pos = m.end()
        return m.group()

    def options(self, cls: type[Pass]) -> dict[str, Any]:
        self.open_brace = self.pos
        self.pos += 1
        opts: dict[str, Any] = {}
        self.skip_space()
        if self.peek() != "}":              # `{}` holds no options; after a ',' one must follow
            while True:
                key, value = self.option(cls, opts)
                opts[key] = value
                self.skip_space()
                if self.peek() != ",":
                    break
                self.pos += 1
                self.skip_space()
            if self.peek() != "}":
                raise self.error(f"expected ',' or '}}' after the value of '{key}', found {self.found()}")
        self.pos += 1
        self.open_brace = None
        return opts

    def option(self, cls: type[Pass], seen: dict[str, Any]) -> tuple[str, Any]:
        key_pos = self.pos
        key = self.name("an option name")
        if key not in cls.options:
            known = ", ".join(cls.options) or "none"
            raise self.error(f"pass '{cls.name}' has no option '{key}' (options: {known})", key_pos)
        if key in seen:
            raise self.error(f"option '{key}' of pass '{cls.name}' is given twice", key_pos)
        self.skip_space()
        if self.peek() != "=":
            raise self.error(f"expected '=' after option '{key}', found {self.found()}")
        self.pos += 1
        self.skip_space()
        value_pos = self.pos
        text = self.value()
        try:
            return key, cls.options[key].coerce(cls.name, key, text)
        except PassError as e:
            raise self.error(str(e), value_pos) from None

    def value(self) -> str:
        """A JSON string literal, or the raw text up to the next ',' or '}' with its ends trimmed."""
        if self.peek() == '"':
            try:
                value, self.pos = json.JSONDecoder().raw_decode(self.text, self.pos)
            except json.JSONDecodeError as e:
                raise self.error(f"bad quoted value ({e.msg})", e.pos) from None
            return value
        raw = _RAW_VALUE.match(self.text, self.pos).group().rstrip()
        self.pos += len(raw)
        if self.peek() == "{":
            raise self.error("unbalanced braces: '{' inside an option value (quote the value)")
        if not raw:
            hint = " (write \"\" for an empty string)" if self.peek() else ""
            raise self.error(f"expected a value, found {self.found()}{hint}")
        return raw


def _suggest(name: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} (known passes: {', '.join(sorted(known)) or 'none'})"

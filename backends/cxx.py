"""C++ text from values that came out of an artifact, made safe.

The IR comes from an artifact, which anyone can write: nothing from it reaches the C++ verbatim.
Numbers are formatted from parsed int/float values (c_int, c_float), symbolic sizes may name only
the step's `b` and `s` (cxx), and names and source locations appear only in `//` comments,
reduced to characters that cannot end one (comment())."""
from __future__ import annotations

import math
import re

from amxc.ir import dims as D


class CodegenError(ValueError):
    """A node no kernel covers, or a value that cannot become C++; names the op and its source
    location."""


STEP_SIZES = {"b", "s"}    # the only symbolic sizes a step passes (StepArgs::b, ::s)
_UNSAFE_IN_COMMENT = re.compile(r"[^A-Za-z0-9_.,:;()\[\]@%<>=+ -]")


def comment(text: str, limit: int = 160) -> str:
    """`text` made safe inside a `//` comment: no newline, no backslash (a line continuation),
    nothing but plain punctuation, at most `limit` characters."""
    return _UNSAFE_IN_COMMENT.sub("_", str(text))[:limit]


def c_int(v) -> str:
    if isinstance(v, bool) or not isinstance(v, int):
        raise CodegenError(f"expected an integer, got {type(v).__name__} {comment(repr(v), 40)}")
    return str(int(v))


def c_float(v) -> str:
    """A float literal of `v`, formatted from its parsed value."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CodegenError(f"expected a finite number, got {comment(repr(v), 40)}")
    return f"{float(v)!r}f"


def cxx(d) -> str:
    """A dim as a C++ int64 expression over the step's b and s."""
    if isinstance(d, D.Sym):
        if unknown := sorted(D.symbols(d) - STEP_SIZES):
            raise CodegenError(f"size {comment(str(d), 60)} uses {comment(unknown[0], 40)}; native code "
                               f"knows only the step sizes {sorted(STEP_SIZES)}")
        return str(d).replace("//", "/")
    return c_int(d)


def numel(shape) -> str:
    return "*".join(f"({cxx(d)})" for d in shape) or "1"

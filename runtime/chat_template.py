"""Rendering a chat template: code from the model download, so its rendering is bounded in work and in
memory.  The sandbox already keeps it from Python internals; on top of that:

- work: a trace function counts every line the compiled template runs and every Python call
  made meanwhile (jinja's runtime, filters), against a step budget and a clock;
- memory: no single operation may build a value over _MAX_CHARS.  Where the result would be
  allocated in one go ('x' * 10**9, center(10**9), replace, join, formatting) the size is worked
  out from the arguments first; other results, and the lists, tuples and dicts the template
  writes, are measured as they are made.  A value's size counts an item each time it occurs,
  so a list holding the same big list four times, nested ten deep, is refused long before
  printing or comparing it could take forever.  What all operations make is summed too
  (_MAX_ALLOC), since a template can keep thousands of values alive at once, and the output
  and every block's output (macros, {% set %} blocks) are capped as they are written.

The limits are far beyond real templates (a 1000-message conversation takes ~200k steps and a
few MiB) and keep a hostile one to about a second and a few hundred MiB.
"""
from __future__ import annotations

import functools
import json
import pprint
import re
import sys
import threading
import time
from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from datetime import datetime
from itertools import chain
from typing import Any, Callable, Iterable, Mapping

import jinja2
import jinja2.compiler
import jinja2.ext
from jinja2.runtime import LoopContext, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import clip as _clip

_MAX_STEPS = 5_000_000      # template lines run plus Python calls made, per render (~1 s)
_MAX_SECONDS = 5.0          # wall-clock backstop for the same
_MAX_CHARS = 1 << 22        # 4 Mi: the prompt, any one value (characters plus items), any width
_MAX_ALLOC = 256 << 20      # bytes of values made per render, freed ones included
_MAX_INT_BITS = 1 << 16     # integers a template computes (Python prints at most 4300 digits)
_MAX_TEMPLATE = 1 << 17     # template source characters (~2 s to compile); real ones are 2-20 KB
_MAX_INDENT = 64            # tojson's indent, repeated per nesting level; real templates use 2 or 4
_MEMO_MIN = 1024            # values this big have their size remembered for the render
_TEMPLATE_FILE = "<template>"   # co_filename of code jinja compiles from a string


class ChatTemplateError(ValueError):
    """The template cannot be rendered; the message starts with ' ' or with 'LINE: ', to follow
    the template's source name."""


def render(source: str, variables: dict) -> str:
    """`source` rendered with `variables` in the bounded sandbox, with transformers' settings
    and helpers (messages should be made of plain data: see `plain`)."""
    if len(source) > _MAX_TEMPLATE:
        raise ChatTemplateError(f" the chat template is over {_MAX_TEMPLATE} characters")
    try:
        template = _bounded(lambda: _compile(source))
        return _bounded(lambda: _render(template, variables))
    except jinja2.TemplateSyntaxError as e:
        message = f"{e.lineno}: chat template syntax error: {_clip(e.message)}"
    except _Overrun as e:
        message = f" chat template stopped: {e}"
    except jinja2.exceptions.SecurityError as e:
        message = f" the chat template broke the sandbox rules ({_clip(e)})"
    except Exception as e:      # the template is data from the model: any failure is its own
        message = f" chat template failed: {type(e).__name__}: {_clip(e)}"
    raise ChatTemplateError(message)


class _Overrun(BaseException):
    """A limit hit while a template runs.  A BaseException, so that no `except Exception` in
    jinja or a filter can swallow it: the trace function is removed when it raises."""


class _Budget:
    """The allowance of one render or compile, charged by a trace function installed for it."""

    def __init__(self):
        self.steps, self.deadline = 0, time.monotonic() + _MAX_SECONDS
        self.memo: dict[int, tuple[Any, int]] = {}  # id -> (the value, kept so the id stays its, size)
        self.failed: str | None = None
        self.done = False
        self.allocated = 0

    def trace(self, frame, event, arg):
        if self.done:                           # a generator closed after the render
            return None
        self.steps += 1
        if self.steps > _MAX_STEPS:
            self.fail(f"ran past {_MAX_STEPS} steps")
        if not self.steps & 1023 and time.monotonic() > self.deadline:
            self.fail(f"ran past {_MAX_SECONDS} seconds")
        # the template's own frames are traced line by line; any other counts once per call
        return self.trace if frame.f_code.co_filename == _TEMPLATE_FILE else None

    def charge(self, nbytes: int):
        self.allocated += nbytes
        if self.allocated > _MAX_ALLOC:
            self.fail(f"made more than {_MAX_ALLOC >> 20} MiB of values")

    def fail(self, message: str):
        self.failed = self.failed or message    # sticky: every later check fails too
        raise _Overrun(self.failed)


_local = threading.local()


def _budget() -> _Budget:
    return getattr(_local, "budget", None) or _Budget()


def _bounded(fn: Callable[[], Any]) -> Any:
    """fn() under a fresh budget.  The trace function is this thread's only, and the tracer that
    was there before (coverage, a debugger) is put back afterwards, also on errors."""
    budget, previous = _Budget(), sys.gettrace()
    _local.budget = budget
    sys.settrace(budget.trace)
    try:
        return fn()
    finally:
        sys.settrace(previous)
        budget.done, _local.budget = True, None


def _render(template: jinja2.Template, variables: dict) -> str:
    out, chunks = _CappedText("the rendered prompt"), template.generate(**variables)
    try:
        for chunk in chunks:
            out.write(chunk)
    finally:
        _budget().done = True       # closing the generator runs template code: not charged
        chunks.close()
    return out.getvalue()


class _CappedText:
    """A string builder (and pprint stream) that refuses to grow past _MAX_CHARS."""

    def __init__(self, what: str):
        self.what, self.parts, self.size = what, [], 0

    def write(self, text: str):
        self.size += len(text)
        if self.size > _MAX_CHARS:
            _budget().fail(f"{self.what} grew past {_MAX_CHARS} characters")
        self.parts.append(text)

    def getvalue(self) -> str:
        return "".join(self.parts)


_CONTAINERS = (list, tuple, set, frozenset, dict, KeysView, ValuesView, ItemsView)


def _size(value: Any) -> int:
    """What printing, hashing or comparing `value` may cost: the characters of its strings plus
    one per item, an item held many times counted each time; refused past _MAX_CHARS.  Values in
    the immutable sandbox never change, so a big one's size is worked out once per render."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value) + 1
    if isinstance(value, int):
        if value.bit_length() > _MAX_INT_BITS:
            _budget().fail(f"made an integer over {_MAX_INT_BITS} bits")
        return 1
    if not isinstance(value, _CONTAINERS):
        return 1                                # scalars, Undefined, loop, macros: short reprs
    budget = _budget()
    if (known := budget.memo.get(id(value))) is not None:
        return known[1]
    total = 1
    for item in chain.from_iterable(value.items()) if isinstance(value, dict) else value:
        if type(item) is str:                   # inline: every call here is a step of the budget
            total += len(item) + 1
        elif isinstance(item, jinja2.utils.Namespace):  # the one mutable value: kept out of others
            raise jinja2.exceptions.SecurityError("a namespace cannot be stored in a list, dict or namespace")
        else:
            total += _size(item)
        if total > _MAX_CHARS:
            budget.fail(f"made a value over {_MAX_CHARS} characters and items")
    if total >= _MEMO_MIN:
        budget.memo[id(value)] = (value, total)
    return total


def _checked(value: Any) -> Any:
    """`value`, once its size is known to be within the limit."""
    if (budget := _budget()).failed:
        raise _Overrun(budget.failed)
    _size(value)
    return value


def _made(value: Any) -> Any:
    """`value`, just made by an operation: size-checked, and its memory charged to the render.
    A container's strings and numbers are charged with it, as a split makes them; its other
    items come from operations that charged them."""
    _checked(value)
    nbytes = sys.getsizeof(value)
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        items = chain.from_iterable(value.items()) if isinstance(value, dict) else value
        nbytes += sum(sys.getsizeof(v) for v in items if isinstance(v, (str, bytes, int, float)))
    _budget().charge(nbytes)
    return value


def _need(cost: int, what: str):
    """Refuse an operation whose result would be over the limit, before it allocates it."""
    if (budget := _budget()).failed:
        raise _Overrun(budget.failed)
    if cost > _MAX_CHARS:
        budget.fail(f"{what} would make {cost} characters, over {_MAX_CHARS}")


def _check_ints(args: Iterable, what: str):
    """Int arguments are widths and counts to the calls this is used for: bounded like sizes."""
    for v in args:
        if isinstance(v, int) and abs(v) > _MAX_CHARS:
            _need(abs(v), what)


def _materialized(args: tuple) -> tuple:
    """Generators in `args` as lists, so that a size can be worked out before the call consumes
    them (the loop variable is left alone: the template is iterating it)."""
    return tuple(list(a) if isinstance(a, Iterator) and not isinstance(a, LoopContext) else a
                 for a in args)


def _total(items: Iterable) -> int:
    return sum(map(_size, items))


def _replace_cost(s: str, old: str, new: str, count: int | None = -1) -> int:
    n = s.count(old) if count is None or count < 0 else min(count, s.count(old))
    return len(s) + n * max(len(new) - len(old), 0)        # ''.count('') is len + 1, as replace


def _format_cost(fmt: str | bytes, values: Iterable, reusable: bool) -> int:
    """A bound on `fmt % values` or `fmt.format(...)`: the text, every number in it (widths and
    precisions), int arguments where a width can come from one (`%*d`, `{:{}}`), and the
    arguments: each once, or each field holding the largest where fields can repeat one."""
    text = fmt if isinstance(fmt, str) else bytes(fmt).decode("latin-1")
    values = list(values)
    numbers = sum(int(n) if len(n) < 9 else _MAX_CHARS for n in re.findall(r"\d+", text))
    if "*" in text or re.search(r"\{[^}]*\{", text):
        numbers += sum(abs(v) for v in values if isinstance(v, int))
    sizes = [_size(v) for v in values]
    args = max(sizes, default=0) * (text.count("%") + text.count("{")) if reusable else sum(sizes)
    return len(text) + numbers + args


def _percent_cost(fmt: str | bytes, args: Any) -> int:
    if isinstance(args, Mapping):               # %(name)s can repeat a key
        return _format_cost(fmt, args.values(), reusable=True)
    return _format_cost(fmt, args if isinstance(args, tuple) else (args,), reusable=False)


# Result sizes of the str methods and filters that can multiply their input, worked out before
# they run; int arguments of str methods (center, ljust, zfill, ...) are bounded besides.
_STR_METHOD_COST: dict[str, Callable[..., int]] = {
    "replace": _replace_cost,
    "join": lambda sep, items: _total(items) + len(sep) * len(items),
    "format": lambda fmt, *args, **kwargs: _format_cost(fmt, (*args, *kwargs.values()), True),
    "format_map": lambda fmt, mapping: _format_cost(fmt, mapping.values(), True),
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t") * tabsize,
    "translate": lambda s, table: len(s) * _size(table),
}
_FILTER_COST: dict[str, Callable[..., int]] = {
    "replace": lambda s, old, new, count=None: _replace_cost(str(s), str(old), str(new), count),
    "join": lambda items, d="", attribute=None: _total(items) + len(str(d)) * len(items),
    "format": lambda fmt, *args, **kwargs: _percent_cost(str(fmt), kwargs or args),
    "indent": lambda s, width=4, first=False, blank=False: len(str(s)) + (str(s).count("\n") + 1)
              * (width if isinstance(width, int) else len(str(width))),
    "wordwrap": lambda s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True:
                (len(str(s)) + 1) * (1 + len(wrapstring or "\n")),
    "urlize": lambda s, trim_url_limit=None, nofollow=False, target=None, rel=None, extra_schemes=None:
              3 * len(str(s)) + (len(str(s)) // 2 + 1) * (len(str(target or "")) + len(str(rel or "")) + 64),
    # summing lists copies the running total per item: quadratic
    "sum": lambda items, attribute=None, start=0:
           0 if isinstance(start, (int, float)) else len(items) * _total(items),
}
_FILTER_SIZE_ARGS = {"center", "indent", "batch", "slice"}   # int arguments that size the result


def _check_binop(op: str, left: Any, right: Any):
    """Refuse `*`, `**` and `%` whose result would be over the limits, before computing it."""
    bits = 0
    if op == "*" and isinstance(left, int) and isinstance(right, int):
        bits = left.bit_length() + right.bit_length()
    elif op == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int):
            _need((_size(seq) - 1) * n, "*")         # a string's size is len + 1
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        bits = (abs(left).bit_length() - 1) * right
    elif op == "%" and isinstance(left, (str, bytes)):
        _need(_percent_cost(left, right), "%")
    if bits > _MAX_INT_BITS:
        _budget().fail(f"{op} would make an integer over {_MAX_INT_BITS} bits")


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """Jinja compiles list, tuple and dict displays, `~` and block output to plain Python; this
    routes them through the environment's size checks too."""

    def buffer(self, frame):
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    def _bounded(self, visit, node, frame):
        self.write("environment.bounded_value(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node, frame):
        self._bounded(super().visit_List, node, frame)

    def visit_Dict(self, node, frame):
        self._bounded(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame):
        if node.ctx == "load":          # not an assignment target (`for k, v in ...`)
            self._bounded(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)

    @jinja2.compiler.optimizeconst
    def visit_Concat(self, node, frame):
        self.write("environment.bounded_join(context, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute is an error where it is touched rather than
    an Undefined that renders as ''; a template that probes Python internals is hostile.  Calls,
    operators, filters, literals and joins are size-checked (see above)."""

    code_generator_class = _CodeGenerator
    # intercepting every arithmetic operator also stops the compiler folding 'x' * 10**9 into a
    # constant at compile time, outside any check
    intercepted_binops = frozenset(("+", "-", "*", "/", "//", "%", "**"))

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        target = getattr(__obj, "__wrapped__", __obj)   # the sandbox hands out str.format wrapped
        owner = getattr(target, "__self__", None)
        if isinstance(owner, (bytes, bytearray)):
            raise jinja2.exceptions.SecurityError("bytes methods are not available to chat templates")
        if isinstance(owner, (str, int)) and not isinstance(owner, type):
            _check_ints((*args, *kwargs.values()), f"{type(owner).__name__}.{target.__name__}")
            if isinstance(owner, str) and (cost := _STR_METHOD_COST.get(target.__name__)):
                args = _materialized(args)
                _need(cost(owner, *args, **kwargs), f"str.{target.__name__}")
        return _made(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        _check_binop(operator, left, right)
        return _made(super().call_binop(context, operator, left, right))

    def concat(self, chunks):   # the output of a macro, {% call %}, {% filter %} or {% set %} block
        chunks = list(chunks)
        _need(sum(map(len, chunks)), "a block's output")
        return _made("".join(chunks))

    @staticmethod
    def output_buffer():
        return _Buffer()

    @staticmethod
    def bounded_value(value):   # a list, tuple or dict display: only the container itself is new
        _budget().charge(sys.getsizeof(_checked(value)))
        return value

    @staticmethod
    def bounded_join(context, parts):
        _need(_total(parts), "~")
        return _made((markup_join if context.eval_ctx.autoescape else str_join)(parts))


class _Buffer(list):
    """A block's output (macro, {% set %} block, ...), capped and charged as it is written: a
    loop could fill it with big strings long before the block ends."""
    size = 0

    def append(self, chunk):
        self.size += len(chunk)
        if self.size > _MAX_CHARS:
            _budget().fail(f"a block's output grew past {_MAX_CHARS} characters")
        _budget().charge(sys.getsizeof(chunk))
        super().append(chunk)

    def extend(self, chunks):
        for chunk in chunks:
            self.append(chunk)


def _bounded_filter(name: str, f: Callable) -> Callable:
    """`f` with its result size checked, and worked out beforehand where it can multiply."""
    skip = int(hasattr(f, "jinja_pass_arg"))        # jinja passes its context or environment first
    cost = _FILTER_COST.get(name)

    @functools.wraps(f)                             # keeps jinja_pass_arg
    def bounded(*args, **kwargs):
        if name in _FILTER_SIZE_ARGS:
            _check_ints((*args[skip + 1:], *kwargs.values()), f"|{name}")
        if cost is not None:
            args = _materialized(args)
            _need(cost(*args[skip:], **kwargs), f"|{name}")
        return _made(f(*args, **kwargs))
    return bounded


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; for inference it renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, as in transformers, and sizes its contents:
    a namespace is the one value a template can change after making it."""

    def __init__(*args, **kwargs):      # Namespace's signature trick: `self` may be a kwarg too
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        _checked(attrs)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        _checked({**self._Namespace__attrs, name: value})
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    _need(16 * len(fmt), "strftime_now")            # %c, the longest directive, writes 24 for 2
    return datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.  Streamed into
    # a capped buffer, the indent bounded: it is repeated per nesting level on every line.
    if (len(indent) if isinstance(indent, str) else indent or 0) > _MAX_INDENT:
        _budget().fail(f"tojson's indent is over {_MAX_INDENT}")
    out = _CappedText("tojson's output")
    for chunk in json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys).iterencode(x):
        out.write(chunk)
    return out.getvalue()


def _pprint(x):
    # jinja's pprint is pformat(x); printed into a capped buffer as it goes
    out = _CappedText("pprint's output")
    pprint.PrettyPrinter(stream=out).pprint(x)
    return out.getvalue()[:-1]                      # pprint() ends with a newline pformat() lacks


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The template in the environment transformers renders chat templates in
    (chat_template_utils.py); cached, since a server renders the same template per request."""
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters.update(tojson=_tojson, pprint=_pprint)
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                       strftime_now=_strftime_now, dict=lambda *args, **kwargs: dict(*args, **kwargs))
    return env.from_string(template)


def plain(value: Any) -> Any:
    """A copy made of JSON types only; any other object becomes a placeholder naming its type
    (transformers' `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, str):              # subclasses (enums, ...) back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    return f"<{type(value).__name__}>"

"""Pipeline strings: canonical round trip (hypothesis), whitespace and quoting, and errors that
name the column and what is wrong.  The passes are test-only, registered in a registry scope."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amxc.passes import DEFAULT_PIPELINE, REGISTRY, Option, Pass, PassError, register_pass
from amxc.passes.pipeline import format_pipeline, parse_pipeline


class Knobs(Pass):
    """One option of each type."""
    name = "t-knobs"
    options = {"n": Option(int, 4), "f": Option(float, 0.5), "b": Option(bool, False),
               "s": Option(str, "x")}

    def run(self, module):
        return False


class Plain(Pass):
    name = "t-plain"

    def run(self, module):
        return False


@pytest.fixture(scope="module")
def registry():
    with REGISTRY.scope() as scope:
        scope.register(Knobs)
        scope.register(Plain)
        yield scope


def canon(text: str, registry) -> str:
    return format_pipeline(parse_pipeline(text, registry))


@pytest.mark.parametrize("text, expected", [
    ("", ""),
    ("   ", ""),
    ("t-plain", "t-plain"),
    (" t-plain ,t-knobs ", "t-plain,t-knobs"),
    ("t-knobs{}", "t-knobs"),
    ("t-knobs{n=4, f=0.5, b=false, s=x}", "t-knobs"),                 # defaults are left out
    ("t-knobs{ s = hello world , n = -3 }", "t-knobs{n=-3,s=hello world}"),  # option order canonical
    ("t-knobs{b=1,f=1e-5}", "t-knobs{f=1e-05,b=true}"),
    ('t-knobs{s=" a,b{c} "}', 't-knobs{s=" a,b{c} "}'),
    ('t-knobs{s=""}', 't-knobs{s=""}'),
    ('t-knobs{s="plain"}', "t-knobs{s=plain}"),                        # quotes only when needed
    (r"t-knobs{s=C:\dir\file}", r"t-knobs{s=C:\dir\file}"),
    ("t-plain,t-plain", "t-plain,t-plain"),
])
def test_canonical_form(registry, text, expected):
    assert canon(text, registry) == expected
    assert canon(expected, registry) == expected


def test_options_are_typed(registry):
    (p,) = parse_pipeline("t-knobs{n=7,f=2,b=TRUE,s=a=b}", registry)
    assert p.opts == {"n": 7, "f": 2.0, "b": True, "s": "a=b"}
    assert type(p.opts["f"]) is float


def test_default_pipeline_is_canonical():
    assert format_pipeline(parse_pipeline(DEFAULT_PIPELINE)) == DEFAULT_PIPELINE


def test_passes_come_from_the_current_scope():
    with REGISTRY.scope():
        @register_pass("t-scoped")
        class Scoped(Plain):
            pass
        assert isinstance(parse_pipeline("t-scoped")[0], Scoped)
    with pytest.raises(PassError, match="unknown pass 't-scoped'"):
        parse_pipeline("t-scoped")


@pytest.mark.parametrize("text, column, message", [
    ("t-plian", 1, "unknown pass 't-plian'; did you mean 't-plain'? (known passes: "),
    ("t-plain, nope", 10, "unknown pass 'nope'"),
    ("t-plain,", 9, "expected a pass name, found the end"),
    (",t-plain", 1, "expected a pass name, found ','"),
    ("t-plain t-knobs", 9, "expected ',' between passes, found 't'"),
    ("t-plain}", 8, "unbalanced braces: '}' without a matching '{'"),
    ("t-knobs{n=1", 12, "unbalanced braces: the '{' at column 8 is never closed"),
    ("t-knobs{", 9, "expected an option name, found the end (unbalanced braces"),
    ("t-knobs{n=1,}", 13, "expected an option name, found '}'"),
    ("t-knobs{s={}}", 11, "unbalanced braces: '{' inside an option value"),
    ("t-knobs{ m=1}", 10, "pass 't-knobs' has no option 'm' (options: n, f, b, s)"),
    ("t-plain{m=1}", 9, "pass 't-plain' has no option 'm' (options: none)"),
    ("t-knobs{n=1,n=2}", 13, "option 'n' of pass 't-knobs' is given twice"),
    ("t-knobs{n 1}", 11, "expected '=' after option 'n', found '1'"),
    ("t-knobs{n=}", 11, "expected a value, found '}' (write \"\" for an empty string)"),
    ("t-knobs{n=four}", 11, "option 'n' expects int, got 'four'"),
    ("t-knobs{b=maybe}", 11, "option 'b' expects bool, got 'maybe'"),
    ("t-knobs{f=1.5.2}", 11, "option 'f' expects float, got '1.5.2'"),
    ('t-knobs{s="open}', 11, "bad quoted value (Unterminated string"),
    ('t-knobs{s="a" b}', 15, "expected ',' or '}' after the value of 's', found 'b'"),
])
def test_errors_name_the_column_and_the_problem(registry, text, column, message):
    with pytest.raises(PassError) as e:
        parse_pipeline(text, registry)
    assert str(e.value).startswith(f"pipeline column {column}: ")
    assert message in str(e.value)


def test_a_pass_rejecting_its_options_is_reported_at_the_pass(registry):
    class Picky(Knobs):
        name = "t-picky"

        def __init__(self, **opts):
            super().__init__(**opts)
            if self.opts["n"] % 2:
                raise PassError(f"pass '{self.name}': n must be even, got {self.opts['n']}")

    registry.register(Picky)
    with pytest.raises(PassError, match=r"^pipeline column 9: pass 't-picky': n must be even, got 3$"):
        parse_pipeline("t-plain,t-picky{n=3}", registry)


# -- property: format is canonical and parse(format(x)) == x, whatever the spelling ---------------

_values = {"n": st.integers(-10**12, 10**12), "f": st.floats(allow_nan=False),
           "b": st.booleans(), "s": st.text(max_size=12)}
_space = st.sampled_from(["", " ", "  ", "\t"])


@st.composite
def pipelines(draw):
    """(configured passes, a non-canonical spelling of them: random spacing, quoting, order)."""
    passes, parts = [], []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            passes.append(Plain())
            parts.append(draw(_space) + "t-plain" + draw(_space))
            continue
        keys = draw(st.lists(st.sampled_from(sorted(_values)), unique=True))
        opts = {k: draw(_values[k]) for k in keys}
        passes.append(Knobs(**opts))
        items = [draw(_space) + k + draw(_space) + "=" + draw(_space) + _spell(v, draw) + draw(_space)
                 for k, v in opts.items()]
        parts.append(f"{draw(_space)}t-knobs{draw(_space)}{{{','.join(items)}}}{draw(_space)}")
    return passes, ",".join(parts)


def _spell(v, draw) -> str:
    if isinstance(v, bool):
        return draw(st.sampled_from(["true", "True", "1"] if v else ["false", "FALSE", "0"]))
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


@settings(max_examples=300, deadline=None)
@given(pipelines())
def test_round_trip(registry, case):
    passes, spelling = case
    text = format_pipeline(passes)
    parsed = parse_pipeline(text, registry)
    assert format_pipeline(parsed) == text
    assert [p.opts for p in parsed] == [p.opts for p in passes]
    assert format_pipeline(parse_pipeline(spelling, registry)) == text

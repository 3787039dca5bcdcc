"""The IR text form: exact round trip, located parse errors, and a parser that raises nothing but
its own ParseError on any malformed input (hypothesis-generated)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amxc.ir as ir
from amxc.ir import dims as D

SAMPLE = (Path(__file__).parent / "data" / "sample.ir").read_text()


def roundtrip(text: str) -> ir.Module:
    m = ir.parse_module(text)
    printed = ir.print_module(m)
    again = ir.print_module(ir.parse_module(printed))
    assert again == printed
    return m


def test_sample_roundtrips_exactly_and_verifies():
    m = roundtrip(SAMPLE)
    assert ir.print_module(m) == SAMPLE      # the sample is written in canonical form
    ir.verify(m)


def test_sample_runs_with_symbolic_sizes():
    m = ir.parse_module(SAMPLE)
    rng = np.random.default_rng(0)
    m.params["w"].set_data(rng.standard_normal((6, 8)).astype(np.float32))
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    y, cat = ir.run(m, {"x": x})
    np.testing.assert_allclose(y, x @ m.params["w"].load().T * 0.5 + 1e-05, rtol=1e-6)
    assert cat.shape == (2, 6, 8)


def test_parse_error_points_at_line_and_column():
    bad = SAMPLE.replace("%y0 = mul(%lin, %half)", "%y0 = mul(%lin, %nope)")
    with pytest.raises(ir.ParseError) as e:
        ir.parse_module(bad, filename="sample.ir")
    line = next(i for i, l in enumerate(bad.splitlines(), 1) if "%nope" in l)
    assert (e.value.line, e.value.col) == (line, bad.splitlines()[line - 1].index("%nope") + 1)
    assert str(e.value).startswith(f"sample.ir:{line}:") and "undefined value %nope" in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (("linear(", "linaer("), "unknown op 'linaer'"),
    (("{axis = 1}", "{axis = 1.5}"), "attribute 'axis' expects int"),
    (("{axis = 1}", "{axsi = 1}"), "has no attribute 'axsi'"),
    (("f32[b, s, 6]", "f33[b, s, 6]"), "unknown dtype 'f33'"),
    (("return %y, %cat", "return %y"), "returned types do not match"),
    (("scale_block=256", "scale_block=f32"), "'scale_block' must be an integer"),
    (("block=64,", "block=\"64\","), "'block' must be an integer"),
])
def test_semantic_errors_are_parse_errors(edit, message):
    with pytest.raises(ir.ParseError, match=message):
        ir.parse_module(SAMPLE.replace(*edit, 1))


def test_verifier_names_node_and_source_location():
    bad = SAMPLE.replace(": f32[b, s, 6] loc", ": f32[b, s, 7] loc", 1)
    m = ir.parse_module(bad)
    with pytest.raises(ir.VerifyError) as e:
        ir.verify(m)
    assert "%lin = linear" in str(e.value) and "layers.0.q_proj (model.py:12)" in str(e.value)
    assert "declared type f32[b, s, 7] but the op gives f32[b, s, 6]" in str(e.value)


# -- hypothesis: malformed text never escapes as anything but ParseError -------------------------
ALPHABET = st.sampled_from(list("%@{}[](),:=-+*/#\" \n") + ["->", "//", "f32", "i64", "module", "func",
                                                           "param", "return", "loc", "add", "1",
                                                           "0.5", "s", "b", "true", "inf", "\\u12"])


def _check_any_text(text: str):
    try:
        m = ir.parse_module(text)
    except ir.ParseError as e:
        lines = text.splitlines() or [""]
        assert 1 <= e.line <= len(lines) + 1 and e.col >= 1
        return
    try:
        ir.verify(m)
    except ir.VerifyError:
        return
    printed = ir.print_module(m)
    assert ir.print_module(ir.parse_module(printed)) == printed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_ir_raises_only_parse_errors(data):
    text = SAMPLE
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 12)))
        insert = data.draw(st.lists(ALPHABET, max_size=4).map("".join))
        text = text[:i] + insert + text[j:]
    _check_any_text(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(ALPHABET, max_size=60).map("".join) | st.text(max_size=80))
def test_random_text_raises_only_parse_errors(text):
    _check_any_text(text)


# -- symbolic dims ------------------------------------------------------------------------------
dim_exprs = st.recursive(
    st.integers(0, 9) | st.sampled_from([D.Sym.var("b"), D.Sym.var("s")]),
    lambda inner: st.tuples(st.sampled_from(["+", "-", "*", "//"]), inner, inner).map(
        lambda t: D.binary(t[0], t[1], t[2]) if not (t[0] == "//" and t[2] == 0) else t[1]),
    max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(dim_exprs, st.integers(1, 50), st.integers(1, 50))
def test_dim_expressions_print_parse_and_evaluate_consistently(d, b, s):
    text = f"module @m {{ func @f(%x: f32[b, s]) -> (f32[{d}]) {{ %y = full() {{shape = [{d}], value = 0.0, dtype = f32}} : f32[{d}] return %y }} }}"
    try:
        m = ir.parse_module(text)
    except ir.ParseError as e:      # e.g. a negative literal size
        assert "non-negative" in e.message or "dimension" in e.message
        return
    (parsed,) = m.main.results[0].type.shape
    assert str(parsed) == str(d)
    env = {"b": b, "s": s}
    try:
        want = D.evaluate(d, env)
    except D.DimError:
        return
    assert D.evaluate(parsed, env) == want


@pytest.mark.parametrize("body", ["a" * 3_000_000, "a\\n" * 1_000_000, "\\u00e9" * 400_000],
                         ids=["plain", "escapes", "unicode-escapes"])
def test_huge_string_literals_cost_linear_memory_and_are_refused(body):
    """A hostile graph.ir with a multi-megabyte string: the lexer stops at MAX_STRING with a
    located error, holding no per-character backtracking state (a regex alternation did:
    6.8 GB for 20 MB)."""
    import tracemalloc

    from amxc.ir.parser import MAX_STRING
    text = f'module @m attributes {{note = "{body}"}} {{\n}}\n'
    tracemalloc.start()
    try:
        with pytest.raises(ir.ParseError, match=f"longer than {MAX_STRING}") as e:
            ir.parse_module(text, filename="evil.ir")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.line == 1 and "evil.ir:1:" in str(e.value)
    assert peak < 8 * len(text) + (16 << 20), f"lexing used {peak / 2**20:.0f} MB"


def test_strings_just_under_the_limit_still_parse():
    from amxc.ir.parser import MAX_STRING
    m = ir.parse_module(f'module @m attributes {{note = "{"ab" * (MAX_STRING // 2 - 1)}", q = "a\\"b\\n"}} {{\n}}\n')
    assert len(m.attrs["note"]) == MAX_STRING - 2 and m.attrs["q"] == 'a"b\n'

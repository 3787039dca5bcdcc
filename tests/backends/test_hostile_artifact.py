"""An artifact is data someone else wrote: no string in graph.ir or manifest.json may reach the
generated C++ anywhere but inside a `//` comment, reduced to harmless characters.

The oracle is a small C++ lexer written here (code_positions), independent of the code
generator: it keeps what the compiler would read as code and drops comments (with their
backslash-newline continuations, as C++ does) and string/char literals.  A marker placed at the
start of every hostile string must not appear in what is left.  The end-to-end test signs a
hostile artifact as an attacker would and runs it: the payload's command never runs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amxc.backends  # noqa: F401  (registers the lower pass)
from amxc.backends.codegen import generate
from amxc.backends.isa import best_tier
from amxc.ir import parse_module, print_module
from amxc.runtime.artifact import load_artifact
from support.artifacts import resign

MARKER = "QZXJW"            # never occurs in generated code by chance (checked below)
ESCAPES = ["\n", "\r", "*/", "/*", "\"", "'", "\\", "\\\n", "\x00", "??/", "#include <cstdlib>\n",
           "\u2028", "\x85"]
PAYLOAD = 'x\n  system("touch {sentinel}"); //'      # a statement inside the step function


def code_positions(src: str) -> str:
    """`src` with comments and string/char literals removed: what g++ parses as code."""
    out, i, n = [], 0, len(src)
    while i < n:
        c, nxt = src[i], src[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":                     # to the end of the line, unless continued
            i += 2
            while i < n and not (src[i] == "\n" and src[i - 1] != "\\"):
                i += 1
        elif c == "/" and nxt == "*":
            end = src.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c in "\"'":
            i += 1
            while i < n and src[i] != c:
                i += 2 if src[i] == "\\" else 1
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def test_the_lexer_sees_through_comments_and_strings():
    src = 'int a; // QZXJW \\\n still comment QZXJW\nint b; /* QZXJW */ const char* s = "QZXJW\\"QZXJW";'
    code = code_positions(src)
    assert MARKER not in code and "int a;" in code and "int b;" in code
    assert MARKER in code_positions("int a; // x\nint QZXJW;")     # the lexer can fail


class _IR(str):
    def __repr__(self) -> str:            # hypothesis prints fixtures of a failing case
        return "<stories260K graph.ir>"


@pytest.fixture(scope="module")
def stories_ir(stories_art) -> str:
    return _IR((stories_art / "graph.ir").read_text())


class _Long(str):
    def __repr__(self) -> str:
        return f"<{len(self)} hostile characters>"


hostile = st.lists(st.sampled_from(ESCAPES) | st.text(max_size=8), min_size=1, max_size=12).map(
    lambda parts: MARKER + "".join(parts))
long_hostile = st.integers(10_000, 100_000).map(lambda n: _Long(MARKER + "\n\\*/\"" * (n // 5)))


def _poison(module, text: str, key: str) -> None:
    """`text` in every string-valued place of the module: locations, module and parameter
    attributes (as keys and as values), and string attributes of nodes."""
    module.attrs[key] = text
    module.attrs[text] = "x"
    module.attrs["nested"] = {text: [text, {"k": text}]}
    for p in module.params.values():
        p.attrs[text] = text
    for fn in module.functions.values():
        for node in fn.nodes:
            node.loc = text
            for name, attr in node.opdef.attrs.items():
                if attr.kind in ("str", "any"):
                    node.attrs[name] = text


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=hostile | long_hostile)
def test_hostile_strings_stay_out_of_the_generated_code(stories_ir, text):
    module = parse_module(stories_ir)
    _poison(module, text, "family_note")
    module = parse_module(print_module(module))          # what an artifact's graph.ir parses to
    assert any(n.loc == text for n in module.main.nodes)
    for tier in ("ref", "amx"):
        for options in ({}, {"profile": True, "trace": True}):
            source = generate(module, tier, **options).source
            assert MARKER not in code_positions(source), "a hostile string reached code"
            for line in source.splitlines():                # comments hold only plain characters
                if MARKER in line:
                    tail = line[line.index("//"):]
                    assert not set(tail) & set("\\\"'*\x00\r\u2028\x85"), line[:200]
                    assert len(line) < 400


def test_the_marker_is_absent_from_honest_code(stories_ir):
    assert MARKER not in generate(parse_module(stories_ir), "amx").source


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=hostile)
def test_hostile_manifest_strings_stay_out_of_the_generated_code(stories_art, tmp_path_factory, text):
    """manifest.json's strings (config values and keys, model name, pipeline) are data for the
    runtime, never input to the code generator."""
    from amxc.runtime.engine import Engine
    art = tmp_path_factory.mktemp("manifest") / "hostile.amxc"
    shutil.copytree(stories_art, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["config"].update({"note": text, text: text, "model_type": text})
    manifest.update(model=text, pipeline=text, created=text)
    (art / "manifest.json").write_text(json.dumps(manifest))
    resign(art)
    engine = Engine.load(art)
    assert engine.manifest["model"] == text
    assert MARKER not in code_positions(engine.program.source)
    assert engine.generate([1, 400, 401], max_new_tokens=2).ids


def test_a_signed_hostile_artifact_never_runs_its_payload(stories_art, tmp_path):
    """The attack of issue 12: a location that ends the C++ comment and calls system(), in a
    constructor too, with the hashes recomputed.  `amxc run` generates, builds and runs it."""
    art = tmp_path / "hostile.amxc"
    shutil.copytree(stories_art, art)
    sentinel = tmp_path / "pwned"
    payload = PAYLOAD.format(sentinel=sentinel)
    module = parse_module((art / "graph.ir").read_text())
    for fn in module.functions.values():
        for node in fn.nodes:
            node.loc = payload
    module.attrs["note"] = payload
    (art / "graph.ir").write_text(print_module(module))
    resign(art)
    load_artifact(art)                                   # the signature holds: it loads
    # a forced tier makes a failed build an error instead of a fall back to the interpreter
    env = {**os.environ, "AMXC_CACHE": str(tmp_path / "cache"), "AMXC_ISA": best_tier()}
    proc = subprocess.run([sys.executable, "-m", "amxc.cli", "run", str(art), "-p", "Once", "-n", "4"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    assert not sentinel.exists(), "the artifact's payload ran"
    built = list((tmp_path / "cache" / "kernels").glob("*.cpp"))
    assert built and all(str(sentinel) not in code_positions(p.read_text()) for p in built)

"""Hostile tokenizer folders: a chat template's render is bounded in steps, time, value sizes and
output, and malformed tokenizer files are TokenizerErrors naming the file.  Needs no real model:
a one-word tokenizer stands in (the real templates are held to transformers in test_tokenizer)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import sys
import time
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend, models, pre_tokenizers

import amxc.runtime.chat_template as sandbox
import amxc.runtime.tokenizer as tokenizer_module
from amxc.runtime.tokenizer import Tokenizer, TokenizerError
from conftest import SHARED_MODELS

BACKEND = Backend(models.WordLevel({"[UNK]": 0, "a": 1, "<s>": 2, "</s>": 3}, unk_token="[UNK]"))
BACKEND.pre_tokenizer = pre_tokenizers.Whitespace()
CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
LONG = [{"role": "user", "content": "hi"}] * 2000


class Hung(BaseException):
    """Raised by the alarm: a BaseException, so that no handler under test can swallow it."""


def _hung(*_):
    raise Hung("the render did not stop")


@contextlib.contextmanager
def guarded(seconds: int = 30, memory: int = 3 << 30):
    """If a limit ever regresses, fail the test instead of hanging or exhausting the machine:
    an alarm after `seconds` and at most `memory` more address space (Linux)."""
    statm = Path("/proc/self/statm")
    old_as = resource.getrlimit(resource.RLIMIT_AS)
    if statm.exists():
        used = int(statm.read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (used + memory, old_as[1]))
    old_alarm = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_alarm)
        resource.setrlimit(resource.RLIMIT_AS, old_as)


def hostile(template: str, messages=CONVERSATION) -> str:
    """The error rendering `template` ends in, checked to come quickly and with little memory."""
    tok = Tokenizer(BACKEND, chat_template=template, chat_template_source="evil.jinja")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux
    start = time.monotonic()
    with guarded(), pytest.raises(TokenizerError) as error:
        tok.apply_chat_template(messages)
    assert time.monotonic() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 600 << 10, "peak memory grew"
    message = str(error.value)
    assert message.startswith("evil.jinja: "), message
    return message


# --- work ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", [
    # the template: 10**10 iterations, each one cheap
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    # no call, filter or operator inside: only the trace function sees these loops
    "{% for a in messages %}{% for b in messages %}{% for c in messages %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    # 2**40 macro calls
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
], ids=["nested-range", "long-list", "macro-tree"])
def test_endless_work_stops_at_the_step_budget(template, monkeypatch):
    # the clock (its own test below) must not win on a loaded machine: a macro-tree step is
    # slow enough that 5 M of them passed 5 s beside another test worker
    monkeypatch.setattr(sandbox, "_MAX_SECONDS", 300.0)
    assert "chat template stopped: ran past 5000000 steps" in hostile(template, LONG)


def test_the_clock_is_a_backstop(monkeypatch):
    monkeypatch.setattr(sandbox, "_MAX_STEPS", 10**12)
    monkeypatch.setattr(sandbox, "_MAX_SECONDS", 0.2)
    assert "ran past 0.2 seconds" in hostile("{% for i in range(100000) %}{% for j in range(100000) %}"
                                             "{% endfor %}{% endfor %}")


def test_the_trace_function_aborts_through_code_that_catches_exceptions():
    """The budget runs out (almost surely) inside a generator that swallows every Exception:
    the render must stop there, not go on untraced (Python removes a trace function that raises)."""
    template = "{% for x in probe() %}{{ x }}{% endfor %}"
    calls = []

    def step():
        pass

    def work():
        calls.append(1)
        for _ in range(1000):
            step()

    def probe():
        for _ in range(10**7):
            try:
                work()
            except Exception:
                pass
            yield 1

    sandbox._compile(template).environment.globals["probe"] = probe
    assert "ran past 5000000 steps" in hostile(template)
    assert len(calls) < 10**4


def test_a_previous_tracer_is_put_back():
    """Coverage or a debugger tracing the caller keeps tracing after a render, failed or not."""
    def tracer(frame, event, arg):
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        Tokenizer(BACKEND, chat_template="{{ messages|length }}").apply_chat_template(CONVERSATION)
        assert sys.gettrace() is tracer
        with pytest.raises(TokenizerError):
            Tokenizer(BACKEND, chat_template="{% for i in range(100000) %}{% for j in range(100000) %}"
                      "{% endfor %}{% endfor %}").apply_chat_template(CONVERSATION)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(previous)


# --- memory --------------------------------------------------------------------------------------

@pytest.mark.parametrize("template,message", [
    ("{{ 'x' * 10**9 }}", r"\* would make 1000000000 characters"),
    ("{{ 'x' * 1000000000 }}", r"\* would make 1000000000 characters"),      # not folded at compile
    ("{{ 'x'|center(10**9) }}", r"\|center would make 1000000000 characters"),
    ("{{ 'x'|center(1000000000) }}", r"\|center would make 1000000000 characters"),
    ("{{ 'a'.ljust(10**9) }}", r"str\.ljust would make 1000000000 characters"),
    ("{{ (1).to_bytes(10**9, 'big') }}", r"int\.to_bytes would make"),
    ("{{ range(10**9)|list|length }}", r"Range too big"),
    ("{{ 10 ** 1000000000 }}", r"\*\* would make an integer over 65536 bits"),
    ("{{ '%1000000000d' % 1 }}", r"% would make"),
    ("{{ '{:{}}'.format('x', 10**9) }}", r"str\.format would make"),
    ("{{ '%1000000000s'|format('x') }}", r"\|format would make"),
    ("{% set s = 'x' * 1000000 %}{{ s.replace('x', s) }}", r"str\.replace would make"),
    ("{% set s = 'x' * 1000000 %}{{ s|replace('x', s) }}", r"\|replace would make"),
    ("{% set s = 'x' * 1000000 %}{{ range(100000)|join(s) }}", r"\|join would make"),
    ("{% set s = 'x' * 1000000 %}{{ s.join(range(100000)|map('string')) }}", r"str\.join would make"),
    ("{% set s = '\n' * 1000000 %}{{ s|indent(1000000) }}", r"\|indent would make"),
    ("{% set s = '\t' * 1000000 %}{{ s.expandtabs(1000000) }}", r"str\.expandtabs would make"),
    ("{{ [1]|batch(10**9, 'x')|list }}", r"\|batch would make"),
    ("{{ messages|tojson(indent=10**9) }}", r"tojson's indent is over 64"),
    ("{{ (range(100000)|batch(1)|list)|sum(start=[]) }}", r"\|sum would make"),
    # doubling: each step is small, the tenth is not
    ("{% set ns = namespace(s='x' * 10000) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}", r"~ would make"),
    ("{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
     r"\* would make an integer over 65536 bits"),
    # a list holding the same list eight times per level: tiny in memory, 8**6 * 1000 characters
    # to print, and comparing two such values takes as long
    ("{% set a = ['x' * 1000] %}{% set b = [a, a, a, a, a, a, a, a] %}{% set c = [b, b, b, b, b, b, b, b] %}"
     "{% set d = [c, c, c, c, c, c, c, c] %}{% set e = [d, d, d, d, d, d, d, d] %}"
     "{% set f = [e, e, e, e, e, e, e, e] %}{{ f == f[:] }}", r"made a value over 4194304"),
    ("{% set ns = namespace(x=['x']) %}{% for i in range(60) %}{% set ns.x = [ns.x, ns.x]|list %}"
     "{% endfor %}", r"made a value over 4194304"),
], ids=lambda v: v if len(v) < 40 else v[:37] + "...")
def test_huge_values_are_refused_before_they_are_made(template, message):
    assert re.search(message, hostile(template)), message


@pytest.mark.parametrize("template,message", [
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "the rendered prompt grew past 4194304"),
    ("{% macro m() %}{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}{% endmacro %}{{ m() }}",
     "a block's output grew past 4194304"),
    ("{% set b %}{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}{% endset %}",
     "a block's output grew past 4194304"),
    # each value is allowed; two thousand of them alive at once are not
    ("".join("{%% set a%d = 'x' * 4000000 %%}" % i for i in range(2000)), "made more than 256 MiB"),
], ids=["prompt", "macro", "set-block", "many-values"])
def test_output_and_memory_are_capped(template, message):
    assert message in hostile(template)


# --- template errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("template,message", [
    ("{{ foo.bar }}", "chat template failed: UndefinedError: 'foo' is undefined"),
    ("{{ raise_exception('no tools here') }}", "chat template failed: TemplateError: no tools here"),
    ("{{ 1 + 'a' }}", "chat template failed: TypeError"),
    ("{{ ''.__class__ }}", "the chat template broke the sandbox rules"),
    ("{% set ns = namespace() %}{{ [ns] }}", "broke the sandbox rules (a namespace cannot be stored"),
    ("{{ 'x'.encode().decode() }}", "bytes methods are not available"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "chat template failed: RecursionError"),
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "chat template failed: RecursionError"),
    ("{{ raise_exception('x' * 4000000) }}", "(4000000 characters)"),       # clipped message
    ("x" * (1 << 17) + "y", "the chat template is over 131072 characters"),
])
def test_template_errors_name_the_template(template, message):
    assert message in hostile(template)


def test_real_template_renders_a_long_conversation_as_before():
    """The real SmolLM2 template, a 3000-message conversation: the same text as the plain sandbox
    renders, well inside every limit."""
    template_file = SHARED_MODELS / "smollm2-135m-instruct-q4_1" / "chat_template.jinja"
    if not template_file.exists():
        pytest.skip(f"{template_file} not found")
    template = template_file.read_text()
    messages = [{"role": ("user", "assistant")[i % 2], "content": f"message {i} " + "word " * 200}
                for i in range(3000)]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    expected = env.from_string(template).render(messages=messages, add_generation_prompt=True)
    assert len(expected) > 3_000_000
    start = time.monotonic()
    ours = Tokenizer(BACKEND, chat_template=template).apply_chat_template(messages)
    assert ours == expected
    assert time.monotonic() - start < 10


# --- malformed files -----------------------------------------------------------------------------

def tokenizer_dir(tmp_path: Path) -> Path:
    BACKEND.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages[0]['content'] }}"}))
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 3}')
    return tmp_path


def test_the_stand_in_folder_loads(tmp_path):
    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path))
    assert (tok.bos_token_id, tok.eos_token_ids) == (2, {3})
    assert tok.apply_chat_template(CONVERSATION) == "hi"


UNKNOWN_POST_PROCESSOR = json.dumps({"type": "TemplateProcessing", "special_tokens": {},
                                     "single": [{"SpecialToken": {"id": "<nope>", "type_id": 0}}],
                                     "pair": []})


@pytest.mark.parametrize("name,content,message", [
    ("tokenizer.json", b"\x00\xff\xfe garbage", r"tokenizer\.json: not UTF-8 text"),
    ("tokenizer.json", b'{"version": "1.0", "model": {"vocab": "\xff"}}', r"tokenizer\.json: not UTF-8"),
    ("tokenizer.json", b"[" * 100000, r"tokenizer\.json: not a valid tokenizer"),
    ("tokenizer.json", b"null", r"tokenizer\.json: not a valid tokenizer"),
    ("tokenizer_config.json", b"\x89PNG\r\n\x1a\n\x00\x00", r"tokenizer_config\.json: not UTF-8 text"),
    ("tokenizer_config.json", b"[" * 100000, r"tokenizer_config\.json: not valid JSON"),
    ("tokenizer_config.json", b'"a string"', r"tokenizer_config\.json: expected a JSON object, found str"),
    ("tokenizer_config.json", b'{"chat_template": 7}', r"tokenizer_config\.json: chat_template must be"),
    ("tokenizer_config.json", b'{"chat_template": {"default": "x"}}',
     r"tokenizer_config\.json: chat_template"),
    ("tokenizer_config.json", b'{"chat_template": [{"name": ["default"], "template": "x"}, '
                              b'{"name": "default", "template": 1}]}',
     r"tokenizer_config\.json: chat_template"),
    ("tokenizer_config.json", b'{"bos_token": {"content": ["<s>"]}}',
     r"tokenizer_config\.json: bos_token must"),
    ("special_tokens_map.json", b'{"unk_token": ["[UNK]"]}',
     r"special_tokens_map\.json: unk_token must be"),
    ("generation_config.json", b'{"eos_token_id": "3"', r"generation_config\.json: not valid JSON"),
    ("generation_config.json", b'{"eos_token_id": [' + b"1," * 100000 + b'"x"]}',
     r"generation_config\.json: eos_token_id must be token ids .*\(\d+ characters\)"),
    ("chat_template.jinja", b"{{ messages }}\xc3\x28", r"chat_template\.jinja: not UTF-8 text"),
])
def test_malformed_files_are_named(tmp_path, name, content, message):
    folder = tokenizer_dir(tmp_path)
    (folder / name).write_bytes(content)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_dir(folder)


def test_a_tokenizer_that_panics_on_encode_is_refused_at_load(tmp_path):
    """tokenizers loads a post-processor naming an unknown token, then panics (a BaseException)
    on every encode."""
    folder = tokenizer_dir(tmp_path)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["post_processor"] = json.loads(UNKNOWN_POST_PROCESSOR)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizer"):
        Tokenizer.from_dir(folder)


@pytest.mark.parametrize("name,limit", [("tokenizer.json", "_MAX_TOKENIZER_JSON"),
                                        ("tokenizer_config.json", "_MAX_CONFIG_FILE"),
                                        ("chat_template.jinja", "_MAX_CONFIG_FILE")])
def test_oversized_files_are_refused_unread(tmp_path, monkeypatch, name, limit):
    folder = tokenizer_dir(tmp_path)
    (folder / "chat_template.jinja").write_text("{{ messages }}" + " " * 5000)   # the largest
    monkeypatch.setattr(tokenizer_module, limit, (folder / name).stat().st_size - 1)
    with pytest.raises(TokenizerError, match=rf"{name}: larger than the"):
        Tokenizer.from_dir(folder)


def test_template_source_from_config_is_named(tmp_path):
    folder = tokenizer_dir(tmp_path)
    data = json.loads((folder / "tokenizer_config.json").read_text())
    data["chat_template"] = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(data))
    with guarded(), pytest.raises(TokenizerError, match=r"tokenizer_config\.json \(chat_template\): "
                                                        r"chat template stopped: ran past"):
        Tokenizer.from_dir(folder).apply_chat_template(CONVERSATION)

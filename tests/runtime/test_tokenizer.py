"""The runtime tokenizer against transformers' AutoTokenizer on both real models: ids, text,
chat prompts and streamed text; load errors name the file; chat templates stay in the sandbox."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import transformers        # the oracle (a core requirement): never skipped

from amxc.runtime.tokenizer import Tokenizer, TokenizerError
from conftest import SHARED_EVAL

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "chat_template.jinja")

TRICKY = [
    "", " ", "  ", "\n", "\n\n", "\t", "hello", " hello", "hello ", "  two  spaces  ", " \n leading",
    "trailing\n", "a\n\nb", "12345 67.89 0x1F 1,000,000", "3.14159", "héllo wörld, ça va? Ñandú",
    "日本語のテキスト", "Привет, мир", "مرحبا", "😀", "👍🏽", "👨‍👩‍👧‍👦 family", "emoji 😀 in 🎉 text",
    "\u00a0nbsp", "zero\u200bwidth", "<s> a literal bos", "</s>", "<|im_start|>user\nhi<|im_end|>",
    "<unk>", "ÿ þ", "mixed\r\nline endings\r", "tab\tseparated\tvalues", "'quotes' \"double\"",
    "don't won't I'm we've", "a" * 300, "Once upon a time",
]


def eval_lines(n_per_file: int = 150) -> list[str]:
    lines = []
    for path in sorted(SHARED_EVAL.glob("*.txt")):
        lines += [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()][:n_per_file]
    return lines


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf) -> Path:
    return smollm2_gguf.parent


@pytest.fixture(scope="module", params=["stories", "smollm2"])
def pair(request, stories_dir, smollm2_dir):
    """(ours, transformers') for one model directory."""
    path = stories_dir if request.param == "stories" else smollm2_dir
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def texts():
    if not SHARED_EVAL.is_dir():
        pytest.skip(f"eval texts not found in {SHARED_EVAL}")
    lines = eval_lines()
    assert len(lines) >= 250, "expected ~300 lines from ../shared/eval"
    return lines + TRICKY


def test_encode_matches_transformers(pair, texts):
    ours, hf = pair
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == \
                hf(text, add_special_tokens=special)["input_ids"], (text, special)


def test_decode_matches_transformers(pair, texts):
    ours, hf = pair
    rng = random.Random(0)
    sequences = [hf(t)["input_ids"] for t in texts]
    sequences += [[rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 20))] for _ in range(300)]
    for ids in sequences:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                hf.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_special_tokens_and_sizes(pair):
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id == 1
    assert ours.eos_token_ids == {hf.eos_token_id} == {2}
    assert ours.has_chat_template == (hf.chat_template is not None)


def test_known_ids(stories_dir, smollm2_dir):
    """The ids the models' READMEs quote: stories adds BOS, SmolLM2 adds nothing."""
    assert Tokenizer.from_dir(stories_dir).encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert Tokenizer.from_dir(smollm2_dir).encode("Once upon a time") == [6403, 1980, 253, 655]


def test_add_bos_token_in_config_is_ignored_as_transformers_does(smollm2_dir, tmp_path):
    """transformers 5 drops add_bos_token/add_eos_token when tokenizer.json exists; the
    post-processor in tokenizer.json alone decides."""
    copy = copy_tokenizer(smollm2_dir, tmp_path)
    edit_json(copy / "tokenizer_config.json", add_bos_token=True, add_eos_token=True)
    hf = transformers.AutoTokenizer.from_pretrained(copy)
    assert Tokenizer.from_dir(copy).encode("hello world") == hf("hello world")["input_ids"]


# --- chat template -----------------------------------------------------------------------------

CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy? 🇮🇹"},
]


@pytest.mark.parametrize("messages", [CONVERSATION, [{"role": "system", "content": "Be brief."},
                                                     *CONVERSATION[:1]]])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(smollm2_dir, messages, generation_prompt):
    ours = Tokenizer.from_dir(smollm2_dir)
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False,
                                          add_generation_prompt=generation_prompt)
    assert text.endswith("<|im_start|>assistant\n") == generation_prompt


# A template exercising what transformers' environment adds: loop controls, its tojson (no HTML
# escaping), namespace, raise_exception, the special-token variables, trim/lstrip blocks and
# the {% generation %} tag.
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] not in ['user', 'assistant', 'system'] %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
    {% if loop.index > 3 %}{% break %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if m['role'] == 'assistant' %}
{% generation %}[{{ m['content'] }}]{% endgeneration %}
    {% else %}
{{ m['role'] }}: {{ m | tojson }}
    {% endif %}
{% endfor %}
{{ ns.n }} {{ eos_token }}{% if add_generation_prompt %}>{% endif %}"""


def test_template_features_match_transformers(smollm2_dir):
    ours = Tokenizer.from_dir(smollm2_dir)
    ours.chat_template = FEATURE_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    messages = CONVERSATION + [{"role": "user", "content": "<b>&'x'</b>", "name": None}]
    assert ours.apply_chat_template(messages) == \
        hf.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, tokenize=False,
                               add_generation_prompt=True)
    with pytest.raises(TokenizerError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


# Everything the render limits reroute (operators, calls, filters, literals, `~`, macro and
# {% set %} block output, namespaces, tojson and pprint): the text must not change.
BOUNDED_TEMPLATE = """{% set ns = namespace(text='', n=0) %}
{% macro show(m) %}<{{ m['role'] }}|{{ m['content'] | replace('a', 'A') | indent(2) }}>{% endmacro %}
{% for m in messages %}
{% set ns.text = ns.text ~ m['role'][:1] %}{% set ns.n = ns.n + 2 * loop.index ** 2 - 1 %}
{{ show(m) }}{{ '%s:%d' % (m['role'], loop.index) }} {{ '{}/{}'.format(loop.index, loop.length) }}
{% endfor %}
{% set block %}{% for x in [1, 2.5, (3, 'z'), {'k': [None, True]}] %}{{ x }};{% endfor %}{% endset %}
{{ block }} {{ ns.text }} {{ ns.n // 3 }} {{ ns.n / 4 }} {{ ns.n % 7 }} {{ 'ab' * 3 }} {{ [1] * 2 + [3] }}
{{ messages | map(attribute='role') | join(', ') }} {{ [[1], [2]] | sum(start=[]) }}
{{ '%05.1f' | format(3.14159) }}
{{ messages[0] | tojson(indent=4, sort_keys=True) }} {{ messages | tojson(separators=(',', ':')) }}
{{ {'b': [1, {'c': 'é'}], 'a': (2, 3)} | pprint }} {{ 'x'.center(9, '*') }} {{ dict(a=1, b=[2]) }}"""


def test_bounded_template_matches_transformers(smollm2_dir):
    ours = Tokenizer.from_dir(smollm2_dir)
    ours.chat_template = BOUNDED_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert ours.apply_chat_template(CONVERSATION) == \
        hf.apply_chat_template(CONVERSATION, chat_template=BOUNDED_TEMPLATE, tokenize=False,
                               add_generation_prompt=True)


def test_no_chat_template(stories_dir):
    tok = Tokenizer.from_dir(stories_dir)
    assert not tok.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",                                 # rendered as '' by transformers
    "{{ messages.__class__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ (messages|attr('__class__')) }}",
    "{% set x = messages.append({'role': 'x'}) %}",      # the environment is immutable
    "{% set ns = namespace(_secret=1) %}",
    "{{ ''['__class__'] }}",
])
def test_sandbox_escapes_raise(smollm2_dir, template):
    tok = Tokenizer.from_dir(smollm2_dir)
    tok.chat_template = template
    with pytest.raises(TokenizerError, match="chat_template.jinja: the chat template broke the sandbox"):
        tok.apply_chat_template(CONVERSATION)


def test_template_syntax_error_names_file_and_line(smollm2_dir, tmp_path):
    copy = copy_tokenizer(smollm2_dir, tmp_path)
    (copy / "chat_template.jinja").write_text("line one\n{% for m in messages %}\n{{ m }")
    with pytest.raises(TokenizerError, match=r"chat_template\.jinja:3: chat template syntax error"):
        Tokenizer.from_dir(copy).apply_chat_template(CONVERSATION)


def test_template_from_tokenizer_config(smollm2_dir, tmp_path):
    copy = copy_tokenizer(smollm2_dir, tmp_path)
    template = (copy / "chat_template.jinja").read_text()
    (copy / "chat_template.jinja").unlink()
    edit_json(copy / "tokenizer_config.json", chat_template=[{"name": "default", "template": template}])
    assert Tokenizer.from_dir(copy).apply_chat_template(CONVERSATION) == \
        Tokenizer.from_dir(smollm2_dir).apply_chat_template(CONVERSATION)


# --- streaming ---------------------------------------------------------------------------------

def stream_all(tok: Tokenizer, ids, context=()) -> list[str]:
    stream = tok.stream(context)
    return [stream.push(i) for i in ids] + [stream.flush()]


def test_stream_equals_decode(pair, texts):
    ours, _ = pair
    for text in texts:
        ids = ours.encode(text)
        pieces = stream_all(ours, ids)
        assert "".join(pieces) == ours.decode(ids), text
        assert not any("\ufffd" in p for p in pieces), (text, pieces)


@pytest.mark.parametrize("text", ["😀", "a 👨‍👩‍👧‍👦 b", "日本"])
def test_stream_never_splits_a_character(pair, text):
    ours, _ = pair
    ids = ours.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()), "the test needs characters split across tokens"
    pieces = stream_all(ours, ids + ours.encode(" end", add_special_tokens=False))
    assert "".join(pieces) == text + " end"
    # out as soon as its last byte is in; a run of SentencePiece byte tokens when it ends
    known = len(ids) + (ids[-1] in ours.byte_token_ids)
    assert "".join(pieces[:known]).startswith(text)
    for piece in pieces:
        piece.encode("utf-8")                            # whole characters only
        assert "\ufffd" not in piece


def test_stream_random_ids_with_flush(pair):
    """Any id sequence, valid UTF-8 or not: pieces plus flush() are exactly decode()."""
    ours, _ = pair
    rng = random.Random(1)
    byte_ids = sorted(ours.byte_token_ids)
    for trial in range(500):
        ids = [rng.choice(byte_ids) if byte_ids and rng.random() < 0.6 else rng.randrange(ours.vocab_size)
               for _ in range(rng.randint(0, 15))]
        for skip in (True, False):
            stream = ours.stream(skip_special_tokens=skip)
            text = "".join(stream.push(i) for i in ids) + stream.flush()
            assert text == ours.decode(ids, skip_special_tokens=skip), (ids, skip)


def test_stream_context_keeps_the_joining_space(stories_dir):
    """SentencePiece drops the leading space of a decoded sequence; with the prompt as context
    the continuation joins on correctly."""
    tok = Tokenizer.from_dir(stories_dir)
    prompt, full = tok.encode("Once upon a time"), tok.encode("Once upon a time there was")
    assert full[:len(prompt)] == prompt
    assert "".join(stream_all(tok, full[len(prompt):], context=prompt)) == " there was"
    assert "".join(stream_all(tok, full[len(prompt):])) == "there was"


# --- loading errors ----------------------------------------------------------------------------

def copy_tokenizer(src: Path, dst: Path) -> Path:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    return dst


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name,content,message", [
    ("tokenizer.json", '{"version": "1.0", "model": {', r"tokenizer\.json: not a valid tokenizer"),
    ("tokenizer.json", '{"version": "1.0"}', r"tokenizer\.json: not a valid tokenizer"),
    ("tokenizer_config.json", "{not json", r"tokenizer_config\.json: not valid JSON"),
    ("tokenizer_config.json", "[1, 2]", r"tokenizer_config\.json: expected a JSON object"),
    ("tokenizer_config.json", '{"eos_token": 2}',
     r"tokenizer_config\.json: eos_token must be a token string"),
    ("generation_config.json", '{"eos_token_id": [2, 99999999]}',
     r"generation_config\.json: eos_token_id must be token ids"),
])
def test_corrupt_files_are_named(smollm2_dir, tmp_path, name, content, message):
    copy = copy_tokenizer(smollm2_dir, tmp_path)
    (copy / name).write_text(content)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_dir(copy)


def test_unknown_special_token_is_named(smollm2_dir, tmp_path):
    copy = copy_tokenizer(smollm2_dir, tmp_path)
    edit_json(copy / "tokenizer_config.json", eos_token={"content": "<|nope|>", "special": True})
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: eos_token '<\|nope\|>' is not"):
        Tokenizer.from_dir(copy)


def test_only_vouched_files_are_read(smollm2_dir, tmp_path):
    """An artifact passes its hash-checked file list: a planted chat template is not used."""
    copy = copy_tokenizer(smollm2_dir, tmp_path)
    listed = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    (copy / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")
    assert not Tokenizer.from_dir(copy, only=listed).has_chat_template
    assert Tokenizer.from_dir(copy).has_chat_template
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(copy, only=listed[1:])


def test_eos_ids_from_a_generation_config_list(smollm2_dir, tmp_path):
    copy = copy_tokenizer(smollm2_dir, tmp_path)
    edit_json(copy / "generation_config.json", eos_token_id=[0, 2])
    assert Tokenizer.from_dir(copy).eos_token_ids == {0, 2}

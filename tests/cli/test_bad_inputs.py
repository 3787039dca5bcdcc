"""Every bad input a careless or hostile user can hand the CLI ends the same way: exit status 2,
exactly one `amxc: error:` line that names the culprit (file, option, variable or value), no
traceback, and nothing of the user's deleted.

The table runs `amxc.cli.main` in this process (a subprocess per row would cost ~3 s of imports
each); an unexpected exception escapes main() and fails the row with its traceback.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from amxc.cli import main
from amxc.ir import parse_module, print_module
from support.artifacts import resign


def edited_artifact(src: Path, dst: Path, edit, sign: bool = True) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    if sign:
        resign(dst)
    return dst


def _graph(edit):
    def apply(art: Path) -> None:
        module = parse_module((art / "graph.ir").read_text())
        edit(module)
        (art / "graph.ir").write_text(print_module(module))
    return apply


def _manifest(edit):
    def apply(art: Path) -> None:
        manifest = json.loads((art / "manifest.json").read_text())
        edit(manifest)
        (art / "manifest.json").write_text(json.dumps(manifest))
    return apply


def _write(rel: str, data: str | bytes):
    def apply(art: Path) -> None:
        path = art / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return apply


def _template(template: str):
    def apply(art: Path) -> None:
        path = art / "tokenizer" / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["chat_template"] = template
        path.write_text(json.dumps(config))
    return apply


ARTIFACTS = {        # name -> (edit, re-signed?)
    "tampered": (_write("graph.ir", "module @x {\n}\n"), False),
    "manifest-not-json": (_write("manifest.json", "{not json"), False),
    "no-decode": (_graph(lambda m: m.functions.pop("decode")), True),
    "config-not-object": (_manifest(lambda m: m.update(config=5)), True),
    "context-not-int": (_manifest(lambda m: m["config"].update(max_position_embeddings="lots")), True),
    "bogus-target": (_graph(lambda m: m.attrs.update(target="z80")), True),
    "bad-tokenizer": (_write("tokenizer/tokenizer.json", b"\x00\xffnot a tokenizer"), True),
    "template-bomb": (_template("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}"
                                "{% endfor %}"), True),
    "template-error": (_template("{{ raise_exception('no system messages') }}"), True),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, stories_art, stories_dir):
    """The files the table refers to: {art}, {model}, {tmp}, {art:NAME} and friends."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "bad.txt").write_bytes(b"valid then \xff\xfe invalid")
    (tmp / "bin.ir").write_bytes(bytes(range(256)) * 4)
    (tmp / "broken.ir").write_text("module @m {\n  func @f(%x: f32[4]) -> (f32[4]) {\n    %y = nope(%x) : f32[4]\n")
    (tmp / "good.ir").write_text((stories_art / "graph.ir").read_text())
    (tmp / "file.txt").write_text("keep me")
    (tmp / "empty.txt").write_text("")
    (tmp / "userdir").mkdir()
    (tmp / "userdir" / "thesis.tex").write_text("years of work")
    (tmp / "sub" / "deeper").mkdir(parents=True)
    (tmp / "sub" / "notes.txt").write_text("keep me too")
    models = {}
    for name, text in (("trunc", None), ("config-list", "[1, 2]"), ("config-json", "{oops"),
                       ("config-type", '{"model_type": "llama", "hidden_size": "wide"}')):
        d = tmp / f"model-{name}"
        shutil.copytree(stories_dir, d)
        for f in d.iterdir():
            f.chmod(0o644)
        if text is None:
            w = d / "model.safetensors"
            w.write_bytes(w.read_bytes()[:w.stat().st_size // 2])
        else:
            (d / "config.json").write_text(text)
        models[name] = d
    arts = {name: edited_artifact(stories_art, tmp / f"{name}.amxc", edit, sign)
            for name, (edit, sign) in ARTIFACTS.items()}
    return {"tmp": tmp, "art": stories_art, "model": stories_dir, "models": models, "arts": arts}


LONG_PROMPT = "once upon a time " * 200
S = "Once upon a time there was a little girl"

# id, argv (formatted with the world), environment, what the error line must name
CASES = [
    # sampling and generation options
    ("temperature-negative", "run {art} -p x --temperature -1", {}, "temperature"),
    ("temperature-nan", "run {art} -p x --temperature nan", {}, "temperature"),
    ("temperature-text", "run {art} -p x --temperature hot", {}, "--temperature"),
    ("top-p-above-1", "run {art} -p x --top-p 2", {}, "top_p"),
    ("top-k-negative", "run {art} -p x --top-k -5", {}, "top_k"),
    ("seed-negative", "run {art} -p x --seed -1", {}, "seed"),
    ("repetition-penalty-zero", "run {art} -p x --repetition-penalty 0", {}, "repetition_penalty"),
    ("max-new-tokens-negative", "run {art} -p x -n -3", {}, "--max-new-tokens"),
    ("kv-tokens-zero", "run {art} -p x --kv-tokens 0", {}, "--kv-tokens"),
    ("prompt-invalid-utf8", ["run", "{art}", "-p", "ok \udcff\udcfe"], {}, "UTF-8"),
    ("prompt-over-context", ["run", "{art}", "-p", LONG_PROMPT], {}, "context is 512"),
    ("prompt-over-kv-cache", ["run", "{art}", "-p", S * 3, "--kv-tokens", "8"], {}, "KV cache"),
    ("chat-without-template", "run {art} -p hi --chat", {}, "chat template"),
    ("bench-zero-prompt", "bench {art} --prompt-tokens 0", {}, "--prompt-tokens"),
    # files the user names
    ("run-missing-artifact", "run {tmp}/nope.amxc -p x", {}, "nope.amxc"),
    ("eval-invalid-utf8", "eval {art} --text {tmp}/bad.txt", {}, "bad.txt"),
    ("eval-missing-text", "eval {art} --text {tmp}/missing.txt", {}, "missing.txt"),
    ("eval-text-is-a-directory", "eval {art} --text {tmp}/userdir", {}, "userdir"),
    ("eval-window-zero", "eval {art} --text {tmp}/file.txt --window 0", {}, "--window"),
    ("opt-binary-input", "opt {tmp}/bin.ir", {}, "bin.ir"),
    ("opt-malformed-ir", "opt {tmp}/broken.ir", {}, "broken.ir:3"),
    ("opt-missing-input", "opt {tmp}/none.ir", {}, "none.ir"),
    ("opt-output-is-a-directory", "opt {tmp}/good.ir --pipeline dce -o {tmp}/userdir", {}, "userdir"),
    ("opt-unknown-pass", "opt {tmp}/good.ir --pipeline nope-pass", {}, "nope-pass"),
    ("opt-pipeline-syntax", "opt {tmp}/good.ir --pipeline dce{{", {}, "pipeline"),
    ("inspect-unknown-function", "inspect {art} --function nope", {}, "--function nope"),
    ("inspect-missing", "inspect {tmp}/nothing", {}, "nothing"),
    ("inspect-output-dir-missing", "inspect {art} -o {tmp}/no/such/dir.ir", {}, "dir.ir"),
    ("pull-unknown-model", "pull nope-model", {}, "nope-model"),
    # compile: models and options
    ("compile-missing-model", "compile {tmp}/nomodel -o {tmp}/o.amxc", {}, "nomodel"),
    ("compile-no-output", "compile {model}", {}, "-o"),
    ("compile-unknown-quant", "compile {model} -o {tmp}/o.amxc --quant int3", {}, "int3"),
    ("compile-unknown-target", "compile {model} -o {tmp}/o.amxc --target z80", {}, "--target"),
    ("compile-calib-without-gptq", "compile {model} -o {tmp}/o.amxc --calib {tmp}/file.txt", {}, "--calib"),
    ("compile-calib-empty", "compile {model} -o {tmp}/o.amxc --quant nf4 --calib {tmp}/empty.txt", {}, "empty.txt"),
    ("compile-calib-too-short", "compile {model} -o {tmp}/o.amxc --quant nf4 --calib {tmp}/file.txt", {},
     "file.txt: 6 tokens"),
    ("compile-missing-plugin", "compile {model} -o {tmp}/o.amxc --pass-plugin {tmp}/none.py:P", {}, "none.py"),
    ("compile-bad-dump-spec", "compile {model} -o {tmp}/o.amxc --dump-ir sometimes", {}, "sometimes"),
    ("compile-truncated-weights", "compile {models[trunc]} -o {tmp}/o.amxc", {}, "model.safetensors"),
    ("compile-config-not-object", "compile {models[config-list]} -o {tmp}/o.amxc", {}, "config.json"),
    ("compile-config-invalid-json", "compile {models[config-json]} -o {tmp}/o.amxc", {}, "config.json"),
    ("compile-config-bad-value", "compile {models[config-type]} -o {tmp}/o.amxc", {}, "config.json"),
    # compile -o: never deletes what is not an artifact
    ("compile-into-user-dir", "compile {model} -o {tmp}/userdir", {}, "userdir"),
    ("compile-into-a-file", "compile {model} -o {tmp}/file.txt", {}, "file.txt"),
    ("compile-into-cwd", "compile {model} -o .", {"cwd": "sub"}, "sub"),
    ("compile-into-parent", "compile {model} -o ..", {"cwd": "sub/deeper"}, "sub"),
    ("compile-into-root", "compile {model} -o /", {}, "artifact to /:"),
    # artifacts edited by someone else
    ("artifact-tampered", "run {arts[tampered]} -p x", {}, "graph.ir"),
    ("artifact-manifest-not-json", "run {arts[manifest-not-json]} -p x", {}, "manifest.json"),
    ("artifact-without-decode", "run {arts[no-decode]} -p x", {}, "@decode"),
    ("artifact-config-not-object", "run {arts[config-not-object]} -p x", {}, "'config'"),
    ("artifact-context-not-int", "run {arts[context-not-int]} -p x", {}, "max_position_embeddings"),
    ("artifact-bogus-target", "run {arts[bogus-target]} -p x", {}, "z80"),
    ("artifact-bad-tokenizer", "run {arts[bad-tokenizer]} -p x", {}, "tokenizer.json"),
    ("artifact-template-bomb", "run {arts[template-bomb]} -p x --chat", {}, "chat template"),
    ("artifact-template-raises", "run {arts[template-error]} -p x --chat", {}, "no system messages"),
    # environment variables
    ("threads-not-a-number", "run {art} -p x", {"AMXC_NUM_THREADS": "abc"}, "AMXC_NUM_THREADS"),
    ("threads-too-many", "run {art} -p x", {"AMXC_NUM_THREADS": "100000"}, "AMXC_NUM_THREADS"),
    ("threads-zero", "run {art} -p x", {"AMXC_NUM_THREADS": "0"}, "AMXC_NUM_THREADS"),
    ("executor-unknown", "run {art} -p x", {"AMXC_EXECUTOR": "bogus"}, "AMXC_EXECUTOR"),
    ("gemv-unknown", "run {art} -p x", {"AMXC_GEMV": "bogus"}, "AMXC_GEMV"),
    ("tiles-unknown", "run {art} -p x", {"AMXC_TILES": "bogus"}, "AMXC_TILES"),
    ("profile-unknown", "run {art} -p x", {"AMXC_PROFILE": "yes"}, "AMXC_PROFILE"),
    ("isa-unknown", "run {art} -p x", {"AMXC_ISA": "z80"}, "AMXC_ISA"),
    ("cache-is-a-file", "run {art} -p x", {"AMXC_CACHE": "{tmp}/file.txt"}, "file.txt"),
]


def _format(value, world) -> str:
    return value.format(**{**world, **{k: str(v) for k, v in world.items() if isinstance(v, Path)}})


@pytest.mark.parametrize("argv, env, culprit", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(world, argv, env, culprit, monkeypatch, capsys):
    argv = argv.split() if isinstance(argv, str) else argv
    argv = [_format(a, world) for a in argv]
    for key, value in env.items():
        if key == "cwd":
            monkeypatch.chdir(world["tmp"] / value)
        else:
            monkeypatch.setenv(key, _format(value, world))
    before = _user_files(world["tmp"])
    try:
        status = main(argv)
    except SystemExit as e:               # argparse's usage errors
        status = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("amxc: error:")]
    assert status == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(lines) == 1, err[-2000:]
    assert culprit in lines[0], lines[0]
    assert _user_files(world["tmp"]) == before, "a bad input deleted or changed the user's files"


def _user_files(root: Path) -> dict[str, bytes]:
    keep = ("file.txt", "thesis.tex", "notes.txt")
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.name in keep}


def test_the_table_is_large_enough():
    assert len(CASES) >= 40

"""Artifact loading: a round trip, and every way of damaging or tampering with an artifact is
rejected with a message naming the file; files the manifest does not list are never opened."""
from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amxc.ir import digest_of
from amxc.runtime.artifact import (FORMAT_VERSION, ArtifactError, load_artifact, manifest_digest,
                                   read_manifest)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, stories_dir) -> Path:
    from amxc.api import compile

    return compile(stories_dir, tmp_path_factory.mktemp("art") / "stories.amxc", progress=False)


@pytest.fixture
def art(compiled, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(compiled, tmp_path / "stories.amxc"))


def rewrite_manifest(art: Path, edit) -> None:
    """Apply `edit` to the manifest and re-sign it, as a careful tamperer would."""
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)
    manifest["manifest_digest"] = manifest_digest(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest, indent=1))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_runtime_imports_no_torch_in_fresh_process():
    """design.md §2: running an artifact needs neither torch nor transformers nor the frontend."""
    code = ("import sys, amxc.runtime.artifact, amxc.runtime.sampling, amxc.runtime.tokenizer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
            "or m.startswith('amxc.frontend')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the good case -----------------------------------------------------------------------------

def test_round_trip(art):
    module, manifest = load_artifact(art)
    assert manifest == read_manifest(art) and manifest["format_version"] == FORMAT_VERSION
    assert manifest["manifest_digest"] == manifest_digest(manifest)
    assert len(module.params) == len(manifest["params"]) == 48
    for name, p in module.params.items():
        data = p.load()
        assert not data.flags.writeable and not data.flags.owndata     # a view of the read-only map
        assert digest_of(data) == p.digest, name          # the bytes graph.ir describes
    assert set(module.functions) == {"prefill", "decode"}


def test_progress_bar_goes_to_stderr_only_when_asked(art, capsys):
    load_artifact(art)
    assert capsys.readouterr().err == ""
    load_artifact(art, progress=True)
    assert "checking hashes" in capsys.readouterr().err


# --- damage ------------------------------------------------------------------------------------

def test_flipped_byte_in_weights(art):
    with open(art / "weights.bin", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)[0]
        f.seek(5000)
        f.write(bytes([byte ^ 0x10]))
    with pytest.raises(ArtifactError, match=r"weights\.bin: content does not match the manifest's sha256"):
        load_artifact(art)


@pytest.mark.parametrize("rel", ["graph.ir", "weights.bin", "tokenizer/tokenizer.json"])
def test_deleted_file(art, rel):
    (art / rel).unlink()
    with pytest.raises(ArtifactError, match=f"{rel}: listed in the manifest but missing"):
        load_artifact(art)


def test_truncated_weights_fail_the_hash_and_then_the_index(art):
    with open(art / "weights.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ArtifactError, match=r"weights\.bin: content does not match"):
        load_artifact(art)
    with pytest.raises(ArtifactError, match=r"manifest\.json: parameter @\S+: bytes \[\d+, \d+\) lie "
                                            r"outside weights\.bin \(1000 bytes\)"):
        load_artifact(art, check_hashes=False)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "not an amxc artifact manifest"),
    ('{"format": "something-else"}', "not an amxc artifact manifest"),
])
def test_unreadable_manifest(art, text, message):
    (art / "manifest.json").write_text(text)
    with pytest.raises(ArtifactError, match=rf"manifest\.json: {message}"):
        load_artifact(art)


def test_missing_manifest(art):
    (art / "manifest.json").unlink()
    with pytest.raises(ArtifactError,
                       match=r"stories\.amxc: not an amxc artifact \(manifest\.json is missing\)"):
        load_artifact(art)


# --- tampering ---------------------------------------------------------------------------------

def test_edited_manifest_is_rejected(art):
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["config"]["num_layers"] = 4          # still valid JSON, still plausible
    (art / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with pytest.raises(ArtifactError, match=r"manifest\.json: edited or corrupted \(digest mismatch\)"):
        read_manifest(art)
    del manifest["manifest_digest"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest\.json: edited or corrupted"):
        load_artifact(art)


@pytest.mark.parametrize("version", [999, 1, None])
def test_unsupported_format_version(art, version):
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["format_version"] = version          # not re-signed: the version is checked first
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=rf"manifest\.json: format version {version} is not supported "
                                            rf"by this amxc \(reads version {FORMAT_VERSION}\); recompile"):
        load_artifact(art)


def set_entry(name, **changes):
    def edit(manifest):
        manifest["params"][name].update(changes)
    return edit


LM_HEAD = "lm_head.weight"             # 131072 bytes at offset 0
LAST_ALIGNED = 1040144 // 64 * 64      # weights.bin of stories260K is 1040144 bytes


@pytest.mark.parametrize("edit,message", [
    (set_entry(LM_HEAD, offset=LAST_ALIGNED),
     rf"bytes \[{LAST_ALIGNED}, {LAST_ALIGNED + 131072}\) lie outside weights\.bin \(1040144 bytes\)"),
    (set_entry(LM_HEAD, offset=-64), "offset -64 is not a non-negative multiple of 64"),
    (set_entry(LM_HEAD, offset=32), "offset 32 is not a non-negative multiple of 64"),
    (set_entry(LM_HEAD, offset="0"), "offset '0' is not a non-negative multiple of 64"),
    (set_entry(LM_HEAD, offset=True), "offset True is not a non-negative multiple of 64"),
    (set_entry(LM_HEAD, offset=2 ** 70), r"bytes \[\d+, \d+\) lie outside weights\.bin"),
    (set_entry(LM_HEAD, nbytes=64), "nbytes 64 should be 131072"),
    (set_entry(LM_HEAD, nbytes=131072.0), r"nbytes 131072\.0 should be 131072"),
    (set_entry(LM_HEAD, dtype="f16"), "dtype 'f16' differs from graph.ir's f32"),
    (set_entry(LM_HEAD, shape=[64, 512]), r"shape \[64, 512\] differs from graph\.ir's \[512, 64\]"),
    (set_entry(LM_HEAD, shape="512x64"), r"shape '512x64' differs from graph\.ir's \[512, 64\]"),
    (lambda m: m["params"].update({LM_HEAD: [0, 131072]}), "index entry must be an object"),
], ids=["outside", "negative", "unaligned", "string", "bool", "huge", "nbytes", "float-nbytes",
         "dtype", "shape", "string-shape", "not-an-object"])
def test_bad_parameter_index_entry(art, edit, message):
    rewrite_manifest(art, edit)
    with pytest.raises(ArtifactError, match=rf"manifest\.json: parameter @{LM_HEAD}: {message}"):
        load_artifact(art)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["params"].pop(LM_HEAD), rf"no weights for parameter @{LM_HEAD}"),
    (lambda m: m["params"].update(ghost={"offset": 0, "nbytes": 4, "dtype": "f32", "shape": [1]}),
     "parameter index names @ghost, which graph.ir does not declare"),
    (lambda m: m.update(params=[]), "'params' must be an object"),
    (lambda m: m.update(files=None), "'files' must be an object"),
    (lambda m: m["files"].pop("graph.ir"), "does not list graph.ir"),
    (lambda m: m["files"].update({"graph.ir": "00" * 31}), "the hash of 'graph.ir' is not a sha256"),
    (lambda m: m["files"].update({"../outside.txt": "00" * 32}), "lists '../outside.txt', which is outside"),
    (lambda m: m["files"].update({"/etc/hostname": "00" * 32}), "lists '/etc/hostname', which is outside"),
], ids=["missing-param", "unknown-param", "params-list", "files-null", "graph-unlisted",
         "short-hash", "dotdot", "absolute"])
def test_inconsistent_manifest(art, edit, message):
    rewrite_manifest(art, edit)
    with pytest.raises(ArtifactError, match=rf"manifest\.json: {message}"):
        load_artifact(art)


def test_listed_link_out_of_the_artifact(art, tmp_path):
    (tmp_path / "secret.txt").write_text("not yours")
    (art / "tokenizer" / "tokenizer.json").unlink()
    (art / "tokenizer" / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ArtifactError, match=r"lists 'tokenizer/tokenizer\.json', which is outside"):
        load_artifact(art)


def test_graph_calling_an_unknown_op_names_the_line(art):
    graph = art / "graph.ir"
    text = graph.read_text()
    line = next(i for i, l in enumerate(text.splitlines(), 1) if " = rms_norm(" in l)
    graph.write_text(text.replace(" = rms_norm(", " = frobnicate(", 1))
    rewrite_manifest(art, lambda m: m["files"].update({"graph.ir": sha256(graph)}))
    with pytest.raises(ArtifactError, match=rf"graph\.ir:{line}:\d+: error: unknown op 'frobnicate'"):
        load_artifact(art)


def test_parameter_with_a_symbolic_shape(art):
    """An unused parameter passes the verifier whatever its shape; it still gets no weights."""
    graph = art / "graph.ir"
    first = "  param @lm_head.weight"
    graph.write_text(graph.read_text().replace(first, "  param @extra : f32[n]\n" + first, 1))

    def edit(manifest):
        manifest["files"]["graph.ir"] = sha256(graph)
        manifest["params"]["extra"] = {"offset": 0, "nbytes": 4, "dtype": "f32", "shape": [1]}
    rewrite_manifest(art, edit)
    with pytest.raises(ArtifactError, match=r"manifest\.json: parameter @extra: graph\.ir gives it a "
                                            r"symbolic shape f32\[n\]"):
        load_artifact(art)


# --- nothing but listed data is read -----------------------------------------------------------

def test_unlisted_files_are_never_opened(art, monkeypatch):
    planted = [art / "payload.pkl", art / "__init__.py", art / "tokenizer" / "loader.py"]
    for path in planted:
        path.write_bytes(b"raise SystemExit('artifact code ran')\n")
        if os.geteuid() != 0:             # root reads through mode 000; the recorder below does not care
            path.chmod(0)
    opened = []

    def recording(original):
        def wrapper(file, *args, **kwargs):
            opened.append(os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else file)
            return original(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(io, "open", recording(io.open))
    monkeypatch.setattr(os, "open", recording(os.open))
    module, _ = load_artifact(art)
    module.params[LM_HEAD].load()
    monkeypatch.undo()

    assert {str(art / "manifest.json"), str(art / "graph.ir"), str(art / "weights.bin")} <= set(opened)
    assert not {str(p) for p in planted} & set(opened)

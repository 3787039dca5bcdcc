"""Artifact loading: a round trip, and every way of damaging or tampering with an artifact is
rejected with a message naming the file; files the manifest does not list are never opened.
Saving: only nothing, an empty directory or an earlier artifact is replaced, atomically, and an
interrupted save leaves the old artifact as it was."""
from __future__ import annotations

import builtins
import ctypes
import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from amxc.ir import digest_of, parse_module
from amxc.runtime import artifact
from amxc.runtime.artifact import (FORMAT, FORMAT_VERSION, ArtifactError, check_output, load_artifact,
                                   manifest_digest, read_manifest, save_artifact)


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


# --- saving: what may be replaced, and how -------------------------------------------------------

TINY = """module @tiny {
  param @w : f32[2, 3]
  param @v : f32[2, 3]
  func @forward(%x: f32[b, 3]) -> (f32[b, 2]) {
    %y = linear(%x, @w) : f32[b, 2]
    return %y
  }
}
"""


def tiny(value: float):
    """A two-parameter module whose weights are all `value`."""
    module = parse_module(TINY)
    for p in module.params.values():
        p.loader = lambda: np.full((2, 3), value, np.float32)
    return module


def save(module, out, **kwargs) -> Path:
    return save_artifact(module, out, progress=False, **kwargs)


def saved_value(art: Path) -> float:
    module, _ = load_artifact(art)
    return float(module.params["w"].load()[0, 0])


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def refused(path, why: str) -> str:
    return rf"^refusing to write the artifact to {re.escape(str(path))}: {why}"


@pytest.fixture
def old_art(tmp_path) -> Path:
    return save(tiny(1.0), tmp_path / "out.amxc")


@pytest.fixture(params=["exchange", "no-renameat2", "EINVAL"])
def swap(request, monkeypatch):
    """How the old artifact is swapped out: renameat2(RENAME_EXCHANGE), or the rename fallback
    when libc has no renameat2 or the kernel/filesystem answers EINVAL.  Records the calls."""
    calls = {"renameat2": 0, "rename": 0}
    real = artifact._renameat2()
    if request.param == "exchange" and real is None:
        pytest.skip("this libc has no renameat2")

    def renameat2(*args):
        calls["renameat2"] += 1
        if request.param == "EINVAL":
            ctypes.set_errno(errno.EINVAL)
            return -1
        return real(*args)

    def rename(src, dst, _real=os.rename):
        calls["rename"] += 1
        return _real(src, dst)

    no_symbol = request.param == "no-renameat2"
    monkeypatch.setattr(artifact, "_renameat2", lambda: None if no_symbol else renameat2)
    monkeypatch.setattr(os, "rename", rename)
    return request.param, calls


def test_save_to_a_new_path_creates_parents(tmp_path):
    out = save(tiny(2.0), tmp_path / "a" / "b" / "out.amxc")
    assert out == tmp_path.resolve() / "a" / "b" / "out.amxc"
    assert saved_value(out) == 2.0 and leftovers(out.parent) == []
    assert out.stat().st_mode & 0o777 == 0o777 & ~artifact._umask()     # not mkdtemp's 0700


def test_save_into_an_empty_directory(tmp_path):
    (tmp_path / "out.amxc").mkdir()
    assert saved_value(save(tiny(2.0), tmp_path / "out.amxc")) == 2.0
    assert leftovers(tmp_path) == []


def test_save_replaces_an_artifact(old_art, swap):
    mode, calls = swap
    assert save(tiny(2.0), old_art) == old_art and saved_value(old_art) == 2.0
    assert leftovers(old_art.parent) == []
    if mode == "exchange":
        assert calls == {"renameat2": 1, "rename": 0}
    else:                       # old aside, new in place
        assert calls["renameat2"] == (mode == "EINVAL") and calls["rename"] == 2


def test_unexpected_renameat2_error_is_raised_and_nothing_moves(old_art, monkeypatch):
    def renameat2(*args):
        ctypes.set_errno(errno.EACCES)
        return -1
    monkeypatch.setattr(artifact, "_renameat2", lambda: renameat2)
    with pytest.raises(PermissionError):
        save(tiny(2.0), old_art)
    assert saved_value(old_art) == 1.0 and leftovers(old_art.parent) == []


@pytest.mark.parametrize("content", [
    {"notes.txt": "mine"},
    {"manifest.json": '{"format": "something-else"}', "notes.txt": "mine"},
    {"manifest.json": "{not json"},
    {"manifest.json": f'["{FORMAT}"]'},
], ids=["user-file", "other-manifest", "bad-json", "json-list"])
def test_save_refuses_a_directory_that_is_not_an_artifact(tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in content.items():
        (out / name).write_text(text)
    why = r"it exists and is not an amxc artifact \(choose another -o, or remove it yourself\)$"
    with pytest.raises(ArtifactError, match=refused(out, why)):
        check_output(out)
    with pytest.raises(ArtifactError, match=refused(out, why)):
        save(tiny(2.0), out)
    assert snapshot(out) == {name: text.encode() for name, text in content.items()}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_save_refuses_the_current_directory_and_its_parents(tmp_path, monkeypatch, out):
    """`-o ..` from a subfolder once deleted the current directory and its siblings.  Both
    directories here even look like artifacts: being the working directory is reason enough."""
    work = tmp_path / "work"
    for folder in (work, work / "sub", work / "sibling"):
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"format": FORMAT}))
        (folder / "notes.txt").write_text(f"{folder.name}'s")
    monkeypatch.chdir(work / "sub")
    before, root_before = snapshot(tmp_path), sorted(os.listdir("/"))
    with pytest.raises(ArtifactError, match=refused(Path(out).resolve(),
                                                    "it is the current directory or one of its parents$")):
        save(tiny(2.0), out)
    assert snapshot(tmp_path) == before and sorted(os.listdir("/")) == root_before


def test_save_refuses_the_home_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ArtifactError, match=refused(home, "it is your home directory$")):
        save(tiny(2.0), home)
    assert snapshot(home) == {"manifest.json": json.dumps({"format": FORMAT}).encode()}
    assert leftovers(tmp_path) == []


def test_save_refuses_a_regular_file(tmp_path):
    out = tmp_path / "out.amxc"
    out.write_text("mine")
    with pytest.raises(ArtifactError, match=refused(out, "it exists and is not a directory")):
        save(tiny(2.0), out)
    assert out.read_text() == "mine" and leftovers(tmp_path) == []


@pytest.mark.parametrize("dangling", [False, True], ids=["to-an-artifact", "dangling"])
def test_save_refuses_a_symlink(old_art, tmp_path, dangling):
    """Even a link to an artifact: the link itself is what -o names, and it is not ours."""
    link = tmp_path / "link.amxc"
    link.symlink_to(tmp_path / "nowhere" if dangling else old_art)
    with pytest.raises(ArtifactError, match=refused(link, r"it is a symbolic link")):
        save(tiny(2.0), link)
    assert link.is_symlink() and saved_value(old_art) == 1.0 and leftovers(tmp_path) == []


def interrupt_in_tokenizer(module):
    def write_tokenizer(path: Path) -> bool:
        path.mkdir()
        (path / "tokenizer.json").write_text("{}")
        raise KeyboardInterrupt
    return {"write_tokenizer": write_tokenizer}


def interrupt_in_second_parameter(module):
    def load():
        raise KeyboardInterrupt
    module.params["v"].loader = load          # @w is written first, then this one fails
    return {}


@pytest.mark.parametrize("interrupt", [interrupt_in_tokenizer, interrupt_in_second_parameter])
def test_interrupted_save_leaves_the_old_artifact(old_art, interrupt):
    module = tiny(2.0)
    with pytest.raises(KeyboardInterrupt):
        save(module, old_art, **interrupt(module))
    assert saved_value(old_art) == 1.0 and leftovers(old_art.parent) == []


def test_interrupted_fallback_swap_puts_the_old_artifact_back(old_art, monkeypatch):
    """Without renameat2 the old artifact is moved aside first; failing to move the new one in
    moves it back."""
    monkeypatch.setattr(artifact, "_renameat2", lambda: None)

    def rename(src, dst, _real=os.rename):
        if Path(src).name.startswith(".out.amxc.tmp-") and Path(dst) == old_art:
            raise KeyboardInterrupt
        return _real(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save(tiny(2.0), old_art)
    assert saved_value(old_art) == 1.0 and leftovers(old_art.parent) == []


def replace_with_user_dir(target: Path):
    """A write_tokenizer callback that, while the save runs, puts a user's directory where the
    old artifact was."""
    def write_tokenizer(path: Path) -> bool:
        shutil.rmtree(target)
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        return False
    return write_tokenizer


def test_target_replaced_during_the_save_is_kept(old_art):
    with pytest.raises(ArtifactError, match=refused(old_art, "it exists and is not an amxc artifact")):
        save(tiny(2.0), old_art, write_tokenizer=replace_with_user_dir(old_art))
    assert snapshot(old_art) == {"notes.txt": b"mine"} and leftovers(old_art.parent) == []


def test_target_replaced_after_the_last_check_is_handed_back(old_art, swap, monkeypatch):
    """What is swapped out is checked again before it is removed: here the user's directory
    appears after the last check_output (skipped), and is moved back untouched."""
    real_check = artifact.check_output

    def write_tokenizer(path: Path) -> bool:
        replace_with_user_dir(old_art)(path)
        monkeypatch.setattr(artifact, "check_output", lambda out: Path(out))
        return False
    monkeypatch.setattr(artifact, "check_output", real_check)
    with pytest.raises(ArtifactError, match=refused(old_art, "it exists and is not an amxc artifact")):
        save(tiny(2.0), old_art, write_tokenizer=write_tokenizer)
    assert snapshot(old_art) == {"notes.txt": b"mine"} and leftovers(old_art.parent) == []
    assert swap[1]["renameat2" if swap[0] == "exchange" else "rename"] >= 2     # moved, then back

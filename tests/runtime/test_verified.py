"""Loading an artifact hashes each file once and remembers it by identity (runtime/verified.py);
a file changed in any way since is hashed again, and tampered bytes are refused."""
from __future__ import annotations

import os
import shutil
import time

import pytest

from amxc.runtime import artifact, verified
from amxc.errors import ArtifactError


@pytest.fixture
def art(tmp_path, stories_art, monkeypatch):
    monkeypatch.setenv("AMXC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AMXC_VERIFY", raising=False)
    copy = tmp_path / "stories.amxc"
    shutil.copytree(stories_art, copy)
    return copy


@pytest.fixture
def hashed(monkeypatch):
    """The files each load hashes."""
    seen: list[str] = []
    real = artifact._sha256_file

    def counting(path, bar=None, **kw):
        seen.append(os.path.basename(path))
        return real(path, bar, **kw)
    monkeypatch.setattr(artifact, "_sha256_file", counting)
    return seen


def _load_after_the_racy_window(art, monkeypatch):
    monkeypatch.setattr(verified, "RACY_SECONDS", -1.0)     # the copy was just written
    artifact.load_artifact(art)


def test_a_second_load_hashes_nothing(art, hashed, monkeypatch):
    _load_after_the_racy_window(art, monkeypatch)
    assert "weights.bin" in hashed and "graph.ir" in hashed
    hashed.clear()
    artifact.load_artifact(art)
    assert hashed == []


def test_tampered_weights_are_refused_after_being_remembered(art, hashed, monkeypatch):
    _load_after_the_racy_window(art, monkeypatch)
    weights = art / "weights.bin"
    st = weights.stat()
    time.sleep(0.05)                                   # past the clock tick of the verification
    with open(weights, "r+b") as f:                    # same size, one byte flipped in place ...
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))     # ... and its mtime put back
    with pytest.raises(ArtifactError, match="weights.bin: content does not match"):
        artifact.load_artifact(art)


def test_a_file_put_in_place_is_hashed_again(art, hashed, monkeypatch):
    _load_after_the_racy_window(art, monkeypatch)
    weights = art / "weights.bin"
    shutil.copy2(weights, art / "w.tmp")
    os.replace(art / "w.tmp", weights)                 # same bytes and mtime, another inode
    hashed.clear()
    artifact.load_artifact(art)
    assert hashed == ["weights.bin"]


def test_files_changed_just_before_verification_are_not_remembered(art, hashed):
    artifact.load_artifact(art)                        # the copy is younger than RACY_SECONDS
    hashed.clear()
    artifact.load_artifact(art)
    assert "weights.bin" in hashed


def test_verify_always_and_an_unsafe_cache_hash_every_time(art, hashed, monkeypatch, tmp_path):
    _load_after_the_racy_window(art, monkeypatch)
    monkeypatch.setenv("AMXC_VERIFY", "always")
    hashed.clear()
    artifact.load_artifact(art)
    assert "weights.bin" in hashed
    monkeypatch.delenv("AMXC_VERIFY")
    os.chmod(tmp_path / "cache" / "verified", 0o777)   # others could plant records: not used
    hashed.clear()
    artifact.load_artifact(art)
    assert "weights.bin" in hashed
    monkeypatch.setenv("AMXC_VERIFY", "sometimes")
    with pytest.raises(ValueError, match="AMXC_VERIFY='sometimes'"):
        artifact.load_artifact(art)

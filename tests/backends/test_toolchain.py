"""The kernel cache is checked, not trusted: a cached library that no longer matches the sha256
recorded when it was built is rebuilt, load() runs only bytes it checked, and a cache directory
others could write is refused.  Each test builds its own source (the test's name is in it), so
no two tests share a library."""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from amxc.backends import toolchain
from amxc.backends.toolchain import CacheError

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def source(test: str, value: int = 42) -> str:
    return f'// {test}\nextern "C" int f() {{ return {value}; }}\n'


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("AMXC_CACHE", str(root))
    return root


def build(test: str, value: int = 42, name: str = "t") -> Path:
    return toolchain.build(source(test, value), "ref", name)


def test_a_checked_library_is_reused(cache, capsys):
    path = build("reused")
    inode = path.stat().st_ino
    assert build("reused") == path and path.stat().st_ino == inode
    assert toolchain.load(path).f() == 42
    assert capsys.readouterr().err == ""


def test_a_truncated_library_is_rebuilt(cache, capsys):
    path = build("truncated")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    assert build("truncated") == path
    err = capsys.readouterr().err
    assert err.startswith("amxc: warning:") and str(path) in err and err.count("\n") == 1
    assert path.stat().st_size == size
    assert toolchain.load(path).f() == 42


def test_an_overwritten_library_is_rebuilt(cache, capsys):
    other = build("overwritten", 7, name="other")
    path = build("overwritten")
    shutil.copyfile(other, path)                         # a valid library, just not this one
    assert build("overwritten") == path
    assert str(path) in capsys.readouterr().err
    assert toolchain.load(path).f() == 42


def test_a_library_without_a_record_is_rebuilt(cache, capsys):
    path = build("unrecorded")
    record = Path(f"{path}.sha256")
    record.unlink()
    build("unrecorded")
    assert str(path) in capsys.readouterr().err
    assert record.exists()
    assert toolchain.load(path).f() == 42


def test_load_refuses_a_library_changed_after_it_was_built(cache):
    other = build("changed", 7, name="other")
    path = build("changed")
    shutil.copyfile(other, path)
    with pytest.raises(CacheError, match=re.escape(str(path))):
        toolchain.load(path)


def test_load_maps_a_private_copy_and_once(cache):
    path = build("private")
    lib = toolchain.load(path)
    assert toolchain.load(path) is lib                   # profile() reads the first load's counters
    assert str(path) not in Path("/proc/self/maps").read_text()
    with open(path, "r+b") as f:                         # the mapped code is not the cache's file:
        f.truncate(0)                                    # no SIGBUS
    assert lib.f() == 42


def test_builds_of_one_key_take_turns(cache):
    path = build("locked")
    fd = os.open(path.with_suffix(".cpp"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    result = []
    worker = threading.Thread(target=lambda: result.append(build("locked")))
    worker.start()
    try:
        worker.join(1.0)
        assert worker.is_alive() and not result
    finally:
        os.close(fd)
        worker.join(60)
    assert result == [path]


@pytest.mark.parametrize("which", ["root", "kernels"])
@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777], ids=oct)
def test_a_cache_others_can_write_is_refused(cache, which, mode):
    build(f"writable-{which}-{mode:o}")
    d = cache if which == "root" else cache / "kernels"
    os.chmod(d, mode)
    with pytest.raises(CacheError, match=rf"{re.escape(str(d))}.*chmod go-w.*AMXC_CACHE"):
        build(f"writable-{which}-{mode:o}")
    with pytest.raises(CacheError):
        toolchain.cache_dir()


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
@pytest.mark.parametrize("which", ["root", "kernels"])
def test_a_cache_owned_by_another_user_is_refused(cache, which):
    toolchain.cache_dir()
    d = cache if which == "root" else cache / "kernels"
    os.chown(d, 65534, -1)
    with pytest.raises(CacheError, match=rf"{re.escape(str(d))}.*uid 65534"):
        build(f"owned-{which}")


def test_a_cache_that_is_a_file_is_a_cache_error(tmp_path, monkeypatch):
    file = tmp_path / "not-a-dir"
    file.write_text("")
    monkeypatch.setenv("AMXC_CACHE", str(file))
    with pytest.raises(CacheError, match=re.escape(str(file))):
        build("file")


@pytest.mark.skipif(os.getuid() == 0, reason="root writes any directory")
def test_an_unwritable_cache_is_a_cache_error(cache):
    toolchain.cache_dir()
    os.chmod(cache / "kernels", 0o500)
    try:
        with pytest.raises(CacheError, match=re.escape(str(cache / "kernels"))):
            build("unwritable")
    finally:
        os.chmod(cache / "kernels", 0o700)


def test_the_cache_is_private(cache):
    old = os.umask(0o022)                                # the usual umask would leave 0o755 / 0o644
    try:
        build("private-files")
        toolchain.build(source("private-files"), "ref", "t", compile_only=True)
    finally:
        os.umask(old)
    kernels = cache / "kernels"
    names = sorted(p.name for p in kernels.iterdir())
    assert {Path(n).suffix for n in names} == {".cpp", ".so", ".o", ".sha256"}, names
    for p in [cache, kernels, *kernels.iterdir()]:
        assert p.stat().st_mode & 0o077 == 0, (p, oct(p.stat().st_mode))

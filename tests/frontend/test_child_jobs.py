"""The frontend's transformers work in a child process (frontend/child_jobs.py): the same module
and tokenizer as in-process, errors carried across, entries reused, and a compile that never
imports torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from amxc.frontend import child_jobs
from amxc.frontend.errors import FrontendError
from amxc.ir import print_module


def _trace_request(model_dir) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    return {"job": "trace", "kind": "hf", "config": config, "name": "stories", "where": str(model_dir / "config.json")}


def test_the_child_traces_what_this_process_traces(stories_dir, tmp_path):
    request = _trace_request(stories_dir)
    (tmp_path / "child").mkdir()
    (tmp_path / "here").mkdir()
    child_jobs._run_in_child(request, tmp_path / "child")
    child_jobs.run_job(request, tmp_path / "here")
    assert (tmp_path / "child" / "module.ir").read_text() == (tmp_path / "here" / "module.ir").read_text()
    assert (tmp_path / "child" / "meta.json").read_text() == (tmp_path / "here" / "meta.json").read_text()
    with np.load(tmp_path / "child" / "buffers.npz") as a, np.load(tmp_path / "here" / "buffers.npz") as b:
        assert a.files == b.files and a.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k])


def test_the_childs_errors_arrive_as_they_were_raised(stories_dir, tmp_path):
    request = _trace_request(stories_dir)
    request["config"]["model_type"] = "gpt_neox"        # transformers reads it, amxc refuses it
    with pytest.raises(FrontendError, match="stories: architecture 'gpt_neox' is not supported"):
        child_jobs._run_in_child(request, tmp_path)
    (tmp_path / "error.json").unlink()
    with pytest.raises(FrontendError, match="(?s)failed in its child process .exit status 1.:.*KeyError"):
        child_jobs._run_in_child({"job": "trace", "where": "x"}, tmp_path)


def test_an_entry_is_traced_once_and_then_read(stories_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AMXC_CACHE", str(tmp_path))
    config = json.loads((stories_dir / "config.json").read_text())
    first = child_jobs.traced_module("hf", config, "stories", "config.json")[0]
    entries = list((tmp_path / "frontend").iterdir())
    assert [e.name.split("-")[0] for e in entries] == ["trace"]

    def no_tracing(*args):
        raise AssertionError("traced again")
    monkeypatch.setattr(child_jobs, "_run_into", no_tracing)
    again = child_jobs.traced_module("hf", config, "stories", "elsewhere/config.json")[0]   # same config
    assert print_module(again) == print_module(first)
    with pytest.raises(AssertionError, match="traced again"):     # another config: another entry
        child_jobs.traced_module("hf", {**config, "rope_theta": 5000.0}, "stories", "config.json")


def test_a_cache_others_can_write_is_refused(stories_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("AMXC_CACHE", str(tmp_path))
    (tmp_path / "frontend").mkdir(mode=0o777)
    (tmp_path / "frontend").chmod(0o777)
    config = json.loads((stories_dir / "config.json").read_text())
    with pytest.raises(FrontendError, match="refusing amxc's cache .*mode 777"):
        child_jobs.traced_module("hf", config, "stories", "config.json")


def test_an_upgrade_of_the_code_or_of_transformers_changes_the_key(monkeypatch):
    request = {"job": "trace", "config": {}}
    key = child_jobs._key(request)
    monkeypatch.setattr(child_jobs, "_version", lambda p: "0.0" if p == "transformers" else None)
    assert child_jobs._key(request) != key
    monkeypatch.undo()
    monkeypatch.setattr(child_jobs, "_code_digest", lambda: "edited")
    assert child_jobs._key(request) != key


def test_the_gguf_tokenizer_from_the_child_is_transformers_own(smollm2_gguf, tmp_path):
    from amxc.frontend.gguf import GGUFCheckpoint

    request = {"job": "gguf-tokenizer", "path": str(smollm2_gguf)}
    (tmp_path / "child").mkdir()
    child_jobs._run_in_child(request, tmp_path / "child")
    GGUFCheckpoint(smollm2_gguf).save_tokenizer(tmp_path / "here")
    names = sorted(f.name for f in (tmp_path / "here").iterdir())
    assert "tokenizer.json" in names
    assert sorted(f.name for f in (tmp_path / "child" / "tokenizer").iterdir()) == names
    for n in names:
        assert (tmp_path / "child" / "tokenizer" / n).read_bytes() == (tmp_path / "here" / n).read_bytes(), n


@pytest.mark.slow
def test_a_calibrated_compile_never_imports_torch(stories_dir, tmp_path):
    """The point of the child: the compiling process stays free of torch and transformers
    (about 0.55 GB resident on SmolLM2) through trace, calibration and lowering."""
    script = textwrap.dedent(f"""
        import sys, amxc
        amxc.compile({str(stories_dir)!r}, {str(tmp_path / 'a.amxc')!r}, quant="nf4", progress=False)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))
    """)
    env = {**os.environ, "AMXC_CACHE": str(tmp_path / "cache")}
    env.pop("AMXC_FRONTEND_IN_PROCESS", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "a.amxc" / "manifest.json").is_file()
    assert [e.name.split("-")[0] for e in (tmp_path / "cache" / "frontend").iterdir()] == ["trace"]

"""The amxc command line, run as a user would (the installed console script)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import amxc.ir as ir
from amxc.ir.ops.cache import DenseKVCache
from amxc.passes import DEFAULT_PIPELINE
from amxc.runtime.artifact import ArtifactError, load_artifact

AMXC = [sys.executable, "-m", "amxc"]


def amxc(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*AMXC, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"amxc {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def stories_art(tmp_path_factory, stories_dir) -> Path:
    art = tmp_path_factory.mktemp("art") / "stories.amxc"
    proc = amxc("compile", stories_dir, "-o", art)
    assert "traced" in proc.stderr and "wrote" in proc.stderr      # progress is shown
    assert f"ran {DEFAULT_PIPELINE.count(',') + 2} passes" in proc.stderr     # the graph passes + lower
    return art


def test_version_and_help():
    assert amxc("--version").stdout.startswith("amxc 0.")
    help_text = amxc("--help").stdout
    for word in ("compile", "inspect", "pull", "examples:"):
        assert word in help_text


def test_compile_writes_a_complete_artifact(stories_art, stories_dir):
    manifest = json.loads((stories_art / "manifest.json").read_text())
    assert manifest["format"] == "amxc-artifact" and manifest["config"]["num_layers"] == 5
    assert manifest["pipeline"] == DEFAULT_PIPELINE + ",lower"     # the default pipeline ran
    assert [p["name"] for p in manifest["passes"]] == DEFAULT_PIPELINE.split(",") + ["lower"]
    assert manifest["target"] == "auto" and manifest["required_isa"] == ["ref"]
    assert {p["origin"] for p in manifest["passes"]} == {"builtin"}
    assert set(manifest["files"]) >= {"graph.ir", "weights.bin", "tokenizer/tokenizer.json"}
    for entry in manifest["params"].values():
        assert entry["offset"] % 64 == 0
    module, _ = load_artifact(stories_art)
    assert set(module.functions) == {"prefill", "decode"}
    ids = np.arange(1, 17, dtype=np.int64)[None]
    cache = DenseKVCache(module.functions["prefill"].args[-1].type, 1, capacity=16)
    logits = ir.run(module, [ids, np.arange(16)[None], cache], function="prefill")[0]
    assert logits.shape == (1, 16, 512) and np.isfinite(logits).all()


def test_inspect_prints_ir_that_parses(stories_art):
    text = amxc("inspect", stories_art).stdout
    module = ir.parse_module(text)
    assert module.name == "stories260K" and len(module.params) == 48


def test_inspect_stats(stories_art):
    out = amxc("inspect", stories_art, "--stats").stdout
    assert "linear" in out and "attention_cached" in out and "rms_norm" in out
    assert "sdpa" not in out                                        # fused
    assert "1,040,144" in out           # 260,036 f32 parameter elements


def test_inspect_draws_svg_and_dot(stories_art, tmp_path):
    amxc("inspect", stories_art, "--format", "svg", "-o", tmp_path / "g.svg")
    svg = (tmp_path / "g.svg").read_text()
    prefill = load_artifact(stories_art)[0].functions["prefill"]
    assert svg.startswith("<svg") and svg.count("<rect") == len(prefill.nodes) + 3 + 1  # ops, args, return
    dot = amxc("inspect", stories_art, "--format", "dot").stdout
    assert dot.startswith('digraph "prefill"') and dot.count("->") > len(prefill.nodes)


def test_inspect_kernels_prints_the_native_plan(stories_art, tmp_path, monkeypatch):
    """--kernels: per function, per node the kernel by row count, the fused residual adds,
    aliases and each buffer's workspace offset and bytes, planned without building C++; the
    host's best tier by default, --target another, AMXC_GEMV=exact the batch-invariant path."""
    from amxc.backends import isa
    from amxc.backends.plan import plan

    monkeypatch.delenv("AMXC_GEMV", raising=False)
    monkeypatch.delenv("AMXC_TILES", raising=False)
    module, _ = load_artifact(stories_art)
    text = amxc("inspect", stories_art, "--kernels").stdout
    want = plan(module, isa.best_tier())
    assert text.startswith(f"kernel plan for @stories260K: tier {isa.best_tier()}, gemv=int8, tiles=int8; "
                           f"workspace {want.workspace:,} bytes\n")
    for fp, fn in zip(want.functions, ("prefill", "decode")):
        assert f"@{fn} (planned for {', '.join(f'{k}={v}' for k, v in fp.sizes.items())}): workspace " \
               f"{fp.workspace:,} bytes, {len(fp.buffers)} buffers" in text
    section = text.split("@decode (")[1]
    rows = [line.split() for line in section.splitlines() if re.match(r"\s+\d+\s+\w+\s+%", line)]
    assert [(int(r[0]), r[1]) for r in rows] == [(i, n.op) for i, n in enumerate(module.functions["decode"].nodes)]
    for line in section.splitlines()[2:]:
        if m := re.search(r"\s([\d,]+)\s+([\d,]+)(?:\s|$)", line):
            offset, size = (int(g.replace(",", "")) for g in m.groups())
            assert offset + size <= want.functions[1].workspace, line
    assert "gemv_f32 fp32 (m<=16) | gemm_f32 fp32; + %" in section           # o_proj absorbs the residual add
    assert "residual epilogue of #" in section and "alias of %" in section and "rt attention_cached" in section
    assert "down 64x172 f32" in section and "; in out" in section

    monkeypatch.setenv("AMXC_GEMV", "exact")
    exact = amxc("inspect", stories_art, "--kernels", "--target", "avx2").stdout
    assert exact.startswith("kernel plan for @stories260K: tier avx2, gemv=exact, tiles=int8")
    assert "gemm_f32 fp32" in exact and "gemv_" not in exact

    proc = amxc("inspect", stories_art, "--kernels", "--target", "avx3", check=False)
    assert proc.returncode == 2 and "--target avx3: not a tier" in proc.stderr
    (tmp_path / "f.ir").write_text(ir.print_module(ir.parse_module(
        "module @m {\n  func @forward(%x: f32[2]) -> (f32[2]) {\n    %y = neg(%x) : f32[2]\n    return %y\n  }\n}")))
    proc = amxc("inspect", tmp_path / "f.ir", "--kernels", check=False)
    assert proc.returncode == 2 and "has no @prefill or @decode" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_traces_a_model_directly(stories_dir):
    assert "func @forward" in amxc("inspect", stories_dir).stdout


def test_missing_model_is_one_clear_line():
    proc = amxc("compile", "no/such/model", "-o", "x.amxc", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("amxc: error: no/such/model: no such file")
    assert "Traceback" not in proc.stderr


def test_tampered_artifact_is_rejected(stories_art, tmp_path):
    art = tmp_path / "tampered.amxc"
    shutil.copytree(stories_art, art)
    with open(art / "weights.bin", "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ArtifactError, match="weights.bin: content does not match"):
        load_artifact(art)
    proc = amxc("inspect", art, check=False)
    assert proc.returncode == 2 and "weights.bin" in proc.stderr


def test_compile_prebuilds_the_kernels_the_first_run_needs(tmp_path, stories_dir, monkeypatch):
    """`amxc compile` leaves this machine's kernels in the cache: `amxc run` builds nothing."""
    monkeypatch.setenv("AMXC_CACHE", str(tmp_path / "cache"))
    art = tmp_path / "s.amxc"
    proc = amxc("compile", stories_dir, "-o", art, "--quant", "nf4{method=rtn}")
    assert re.search(r"built the \w+ kernels in", proc.stderr)
    libraries = sorted((tmp_path / "cache" / "kernels").glob("*.so"))
    assert len(libraries) == 1
    amxc("run", art, "-p", "Once upon", "-n", "3")
    assert sorted((tmp_path / "cache" / "kernels").glob("*.so")) == libraries
    amxc("compile", stories_dir, "-o", tmp_path / "t.amxc", "--quant", "nf4{method=rtn}", "--no-prebuild")
    assert sorted((tmp_path / "cache" / "kernels").glob("*.so")) == libraries

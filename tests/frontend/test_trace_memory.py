"""Issue #2, show 4: tracing (and compiling) a 1.1B Llama with TinyLlama's config peaks below
2x its fp32 weight bytes in resident memory: the graph is traced weightless and weights stream
one tensor at a time.  Measured in fresh processes by benchmarks/trace_memory.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import trace_memory  # noqa: E402


@pytest.mark.slow
def test_tinyllama_trace_and_compile_peak_below_twice_fp32_weights(tmp_path):
    n = trace_memory.write_checkpoint(tmp_path / "ckpt")
    fp32 = 4 * n
    assert n == 1_100_048_384
    trace_peak, _ = trace_memory.peak_rss_of(
        [sys.executable, "-m", "amxc", "inspect", str(tmp_path / "ckpt"), "--stats", "-o",
         str(tmp_path / "stats.txt")])
    compile_peak, _ = trace_memory.peak_rss_of(
        [sys.executable, "-m", "amxc", "compile", str(tmp_path / "ckpt"), "-o", str(tmp_path / "a.amxc"), "-q"])
    print(f"trace {trace_peak / fp32:.2f}x, compile {compile_peak / fp32:.2f}x of {fp32 / 1e9:.2f} GB fp32")
    assert trace_peak < 2 * fp32 and compile_peak < 2 * fp32
    assert (tmp_path / "a.amxc" / "weights.bin").stat().st_size >= fp32
    rope_inv_freq = 2048 // 32 // 2       # the one traced buffer besides the weights
    assert f"{n + rope_inv_freq:,} parameter elements" in (tmp_path / "stats.txt").read_text()

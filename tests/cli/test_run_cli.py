"""amxc run / chat / bench as a user runs them (subprocesses on compiled artifacts)."""
from __future__ import annotations

import json
import subprocess
import sys

from amxc.runtime.engine import Engine


def amxc(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "amxc", *map(str, args)], capture_output=True,
                          text=True, input=stdin, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_run_prints_the_greedy_continuation(stories_art):
    out = amxc("run", stories_art, "-p", "Once upon a time", "-n", "24", "--timing")
    expected = Engine.load(stories_art).generate("Once upon a time", max_new_tokens=24).text
    assert out.stdout.rstrip("\n") == expected
    assert "tok/s" in out.stderr


def test_run_stream_prints_the_same_text(stories_art):
    plain = amxc("run", stories_art, "-p", "The dog", "-n", "16").stdout
    streamed = amxc("run", stories_art, "-p", "The dog", "-n", "16", "--stream").stdout
    assert plain == streamed


def test_chat_answers_with_the_chat_template(smollm2_art):
    out = amxc("chat", smollm2_art, "-n", "32", stdin="What is the capital of France?\n/exit\n")
    print(out.stdout)
    assert "Paris" in out.stdout


def test_bench_reports_speed_and_memory(stories_art):
    figures = json.loads(amxc("bench", stories_art, "--prompt-tokens", "16", "--new-tokens", "8",
                              "--json").stdout)
    assert figures["prompt_tokens"] == 16 and figures["new_tokens"] == 8
    assert figures["decode_tok_s"] > 0 and figures["prefill_tok_s"] > 0 and figures["peak_rss_mb"] > 0


def test_compile_quant_nf4_then_run(stories_dir, tmp_path):
    """The NF4 path as a user takes it: `amxc compile --quant nf4`, then `amxc run`."""
    art = tmp_path / "stories-nf4.amxc"
    amxc("compile", stories_dir, "-o", art, "--quant", "nf4")
    manifest = json.loads((art / "manifest.json").read_text())
    assert "quantize-nf4" in json.dumps(manifest["pipeline"])
    out = amxc("run", art, "-p", "Once upon a time", "-n", "24").stdout
    assert out.rstrip("\n") == Engine.load(art).generate("Once upon a time", max_new_tokens=24).text
    assert len(out.split()) >= 10                  # it generated words, not nothing

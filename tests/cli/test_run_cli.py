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
    assert figures["warm_up_s"] is not None and figures["warm_up_s"] >= 0   # timed after a warm-up run
    cold = json.loads(amxc("bench", stories_art, "--prompt-tokens", "16", "--new-tokens", "8", "--json",
                           "--cold").stdout)
    assert cold["warm_up_s"] is None and cold["prompt_tokens"] == 16


def test_compile_quant_nf4_then_run(stories_dir, tmp_path):
    """The NF4 path as a user takes it: `amxc compile --quant nf4`, then `amxc run`."""
    art = tmp_path / "stories-nf4.amxc"
    amxc("compile", stories_dir, "-o", art, "--quant", "nf4")
    manifest = json.loads((art / "manifest.json").read_text())
    assert "quantize-nf4" in json.dumps(manifest["pipeline"])
    out = amxc("run", art, "-p", "Once upon a time", "-n", "24").stdout
    assert out.rstrip("\n") == Engine.load(art).generate("Once upon a time", max_new_tokens=24).text
    assert len(out.split()) >= 10                  # it generated words, not nothing


def test_eval_compare_scores_every_model_on_the_same_tokens(stories_art, stories_dir, shared_eval, tmp_path):
    """`amxc eval A --compare B [C.gguf]`: one table, the same windows for every row; each row's
    perplexity is the one `amxc eval` gives that model alone."""
    rtn = tmp_path / "rtn.amxc"
    amxc("compile", stories_dir, "-o", rtn, "--quant", "nf4{method=rtn}", "-q")
    text = shared_eval / "tinystories_dev.txt"
    window = ["--window", "128", "--stride", "128", "--max-tokens", "700"]
    models = [rtn]
    try:
        import llama_cpp  # noqa: F401  (optional: the llama.cpp row)
        import sys as _sys
        _sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[2] / "benchmarks"))
        from gguf_export import export_f16
        models.append(export_f16(stories_dir, tmp_path / "stories-f16.gguf"))
    except ImportError:
        pass
    rows = json.loads(amxc("eval", stories_art, "--text", text, *window, "--json", "--compare", *models).stdout)
    assert [r["model"] for r in rows[:2]] == [stories_art.name, rtn.name]
    assert len({r["tokens_scored"] for r in rows}) == 1 and rows[0]["tokens_scored"] == 699
    for art, row in zip([stories_art, rtn], rows):
        alone = json.loads(amxc("eval", art, "--text", text, *window, "--json").stdout)
        assert row["perplexity"] == alone["perplexity"]
    assert rows[0]["bytes_per_param"] == 4.0 and rows[1]["bytes_per_param"] < 2.0
    assert rows[0]["bytes_per_layer_weight"] == 4.0 and rows[1]["bytes_per_layer_weight"] < 2.0   # stories260K: down (K=172) stays f32
    assert all(r["decode_tok_s"] > 0 for r in rows)
    if len(rows) == 3:                                 # llama.cpp on f16 weights: close to fp32
        assert abs(rows[2]["perplexity"] / rows[0]["perplexity"] - 1) < 0.01
    table = amxc("eval", stories_art, "--text", text, *window, "--compare", rtn).stdout
    assert "| model | engine | bytes/param | bytes/layer weight | perplexity |" in table

"""The pass flags of the command line, run as a user would: --print-pipeline, `amxc opt` with
dumps, timing and a plugin, and pass errors as one line with exit status 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import amxc.ir as ir
import amxc.backends  # noqa: F401  (registers `lower`)
from amxc.passes import DEFAULT_PIPELINE
from amxc.passes.pipeline import format_pipeline, parse_pipeline

TINY = """\
module @tiny {
  func @forward(%x: f32[2, 3]) -> (f32[2, 3]) {
    %one = constant() {value = 1.0, dtype = f32} : f32[]
    %y = mul(%x, %one) : f32[2, 3]
    %z = neg(%y) : f32[2, 3]
    return %z
  }
}
"""

BREAK_PLUGIN = """\
from amxc.passes import Pass


class Break(Pass):
    name = "t-break"

    def run(self, module):
        del module.main.nodes[0]
        return True
"""


def amxc(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "amxc", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def assert_one_line_error(proc, text: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("amxc: error: ") and text in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_help_shows_the_pass_flags_and_opt():
    top = amxc("--help").stdout
    assert "opt" in top and "--dump-ir after:all" in top and "--pass-plugin" in top
    for command in ("compile", "opt"):
        text = amxc(command, "--help").stdout
        for flag in ("--pipeline", "--pass-plugin", "--print-pipeline", "--dump-ir", "--dump-dir",
                     "--dump-ir-diff", "--no-verify-each", "--timing"):
            assert flag in text, (command, flag)


def test_print_pipeline_needs_no_model():
    proc = amxc("compile", "--print-pipeline")
    assert proc.returncode == 0 and proc.stdout == DEFAULT_PIPELINE + ",lower\n"    # compile lowers last
    assert format_pipeline(parse_pipeline(proc.stdout.strip())) == proc.stdout.strip()
    proc = amxc("opt", "--print-pipeline", "--pipeline", " kv-cache { keep_forward = true , seq = s } , dce ")
    assert proc.stdout == "kv-cache{keep_forward=true},dce\n"


def test_pipeline_errors_are_one_line_with_the_column():
    assert_one_line_error(amxc("compile", "--print-pipeline", "--pipeline", "dce,fuse-atention"),
                          "pipeline column 5: unknown pass 'fuse-atention'; did you mean 'fuse-attention'?")
    assert_one_line_error(amxc("compile", "--print-pipeline", "--pipeline", "kv-cache{keep_forward=maybe}"),
                          "pipeline column 23: pass 'kv-cache': option 'keep_forward' expects bool, got 'maybe'")


def test_compile_checks_the_pipeline_before_tracing():
    # the model does not exist: the pipeline error must come first, without a trace
    proc = amxc("compile", "no/such/model", "-o", "x.amxc", "--pipeline", "dce{", "--dump-ir", "after:all")
    assert_one_line_error(proc, "pipeline column 5: expected an option name, found the end")
    assert_one_line_error(amxc("compile", "no/such/model", "-o", "x.amxc", "--pipeline", "dce",
                               "--dump-ir", "after:cse"),
                          "dump point names pass 'cse', which is not in the pipeline 'dce'")


def test_usage_errors():
    proc = amxc("compile")
    assert proc.returncode == 2 and "compile needs MODEL and -o ART (or --print-pipeline)" in proc.stderr
    proc = amxc("opt")
    assert proc.returncode == 2 and "opt needs FILE.ir (or --print-pipeline)" in proc.stderr


def test_opt_runs_passes_on_ir_text_with_dumps_and_timing(tmp_path):
    src = tmp_path / "tiny.ir"
    src.write_text(TINY)
    out = tmp_path / "out.ir"
    proc = amxc("opt", src, "--pipeline", "canonicalize,dce", "-o", out, "--dump-ir", "after:all",
                "--dump-ir-diff", "--timing")
    assert proc.returncode == 0, proc.stderr
    result = ir.parse_module(out.read_text())
    assert [n.op for n in result.main.nodes] == ["neg"]
    assert "canonicalize" in proc.stderr and "total" in proc.stderr          # the timing table
    dumps = Path(f"{out}.ir-dumps")
    assert sorted(p.name for p in dumps.iterdir()) == ["00-input.ir", "01-canonicalize.diff",
                                                       "01-canonicalize.ir", "02-dce.ir"]
    assert (dumps / "02-dce.ir").read_text() == out.read_text()


def test_opt_prints_to_stdout_and_dumps_beside_the_input(tmp_path):
    src = tmp_path / "tiny.ir"
    src.write_text(TINY)
    proc = amxc("opt", src, "--pipeline", "", "--dump-ir-diff")
    assert proc.returncode == 0 and proc.stdout == TINY
    assert [p.name for p in Path(f"{src}.ir-dumps").iterdir()] == ["00-input.ir"]


def test_a_pass_that_breaks_the_ir_is_named(tmp_path):
    src = tmp_path / "tiny.ir"
    src.write_text(TINY)
    plugin = tmp_path / "breaker.py"
    plugin.write_text(BREAK_PLUGIN)
    proc = amxc("opt", src, "--pass-plugin", f"{plugin}:Break", "--pipeline", "canonicalize,t-break")
    assert_one_line_error(proc, f"pass #2 't-break' (plugin:{plugin}) left invalid IR: "
                                f"error in @forward: returned value %z is not defined")
    proc = amxc("opt", src, "--pass-plugin", plugin, "--pipeline", "t-break", "--no-verify-each")
    assert_one_line_error(proc, "the pipeline left invalid IR (verify after each pass to find the pass "
                                "that broke it): error in @forward at '%y = mul(%x, %one) : f32[2, 3]': "
                                "%one is used before it is defined")

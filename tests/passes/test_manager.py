"""The pass manager: order, records, verify-each blaming the pass that broke the IR, instrument
hooks, the Timing table and DumpIR's files and diffs.  Test-only passes, registered in a scope."""
from __future__ import annotations

import re

import pytest

import amxc.ir as ir
from amxc.passes import REGISTRY, Option, Pass, PassError
from amxc.passes.manager import DumpIR, PassManager, Timing
from amxc.passes.pipeline import parse_pipeline

ORIGIN = f"python:{__name__}"          # where the registry says these test passes come from
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


class Tag(Pass):
    """Appends its label to the module attribute 'trail', so the order of passes shows."""
    name = "t-tag"
    version = 2
    options = {"label": Option(str, "a")}

    def run(self, module):
        module.attrs["trail"] = module.attrs.get("trail", "") + self.opts["label"]
        return True


class Noop(Pass):
    name = "t-noop"

    def run(self, module):
        return False


class DropMulOne(Pass):
    """mul(x, 1.0) -> x when that keeps x's type."""
    name = "t-drop-mul-one"

    def run(self, module):
        fn = module.main
        replaced = {}
        for node in list(fn.nodes):
            node.inputs = [replaced.get(v, v) for v in node.inputs]
            x, c = node.inputs if node.op == "mul" else (None, None)
            if (c is not None and c.producer is not None and c.producer.op == "constant"
                    and c.producer.attrs["value"] == 1.0 and x.type == node.output.type):
                replaced[node.output] = x
                fn.nodes.remove(node)
        fn.results = [replaced.get(v, v) for v in fn.results]
        return bool(replaced)


class Break(Pass):
    """Reverses the node order: values get used before they are defined."""
    name = "t-break"

    def run(self, module):
        module.main.nodes.reverse()
        return True


class Sloppy(Pass):
    name = "t-sloppy"

    def run(self, module):
        return None


class Crash(Pass):
    name = "t-crash"

    def run(self, module):
        raise KeyError("oops")


@pytest.fixture(autouse=True)
def registry():
    with REGISTRY.scope() as scope:
        for cls in (Tag, Noop, DropMulOne, Break, Sloppy, Crash):
            scope.register(cls)
        yield scope


def tiny() -> ir.Module:
    return ir.parse_module(TINY)


def run(pipeline: str, module=None, **kw) -> tuple[ir.Module, PassManager]:
    manager = PassManager(parse_pipeline(pipeline), **kw)
    module = module or tiny()
    assert manager.run(module) is module
    return module, manager


def test_passes_run_in_order_and_are_recorded():
    module, manager = run("t-tag{label=x},t-noop,t-tag{label=y},t-drop-mul-one,t-tag")
    assert module.attrs["trail"] == "xya"
    assert "mul" not in ir.print_module(module)
    assert manager.pipeline == "t-tag{label=x},t-noop,t-tag{label=y},t-drop-mul-one,t-tag"
    assert [(r.name, r.spec, r.version, r.changed) for r in manager.records] == [
        ("t-tag", "t-tag{label=x}", 2, True), ("t-noop", "t-noop", 1, False),
        ("t-tag", "t-tag{label=y}", 2, True), ("t-drop-mul-one", "t-drop-mul-one", 1, True),
        ("t-tag", "t-tag", 2, True)]
    assert {r.origin for r in manager.records} == {ORIGIN}
    assert all(r.seconds >= 0 for r in manager.records)
    assert set(manager.records[0].to_json()) == {"name", "spec", "version", "origin", "changed", "seconds"}


def test_verify_each_names_the_pass_that_broke_the_ir():
    with pytest.raises(PassError) as e:
        run("t-noop,t-break,t-noop")
    msg = str(e.value)
    assert msg.startswith(f"pass #2 't-break' ({ORIGIN}) left invalid IR: ")
    assert "%y is used before it is defined" in msg            # the verifier's own message
    assert isinstance(e.value.__cause__, ir.VerifyError)


def test_without_verify_each_the_broken_ir_gets_through():
    module, manager = run("t-break,t-noop", verify_each=False)
    assert [r.name for r in manager.records] == ["t-break", "t-noop"]
    with pytest.raises(ir.VerifyError):
        ir.verify(module)


def test_an_invalid_input_is_not_blamed_on_a_pass():
    module = tiny()
    module.main.nodes.reverse()
    with pytest.raises(ir.VerifyError):
        run("t-noop", module)


def test_run_must_return_a_bool():
    with pytest.raises(PassError, match=re.escape(f"pass #1 't-sloppy' ({ORIGIN}) returned None; "
                                                  f"run() must return")):
        run("t-sloppy")


def test_a_crashing_pass_keeps_its_traceback_and_is_named():
    with pytest.raises(KeyError) as e:
        run("t-noop,t-crash")
    if hasattr(e.value, "__notes__"):
        assert e.value.__notes__ == [f"while running pass #2 't-crash' ({ORIGIN})"]


class Recorder:
    def __init__(self):
        self.calls = []

    def start(self, passes, module):
        self.calls.append(("start", len(passes)))

    def before_pass(self, pass_, module, index):
        self.calls.append(("before", index, pass_.name))

    def after_pass(self, pass_, module, index, changed, seconds):
        self.calls.append(("after", index, pass_.name, changed))

    def finish(self, module):
        self.calls.append(("finish",))


def test_instrument_hooks_are_called_in_order():
    rec = Recorder()
    run("t-tag,t-noop", instruments=[rec, object()])       # hooks are optional
    assert rec.calls == [("start", 2), ("before", 1, "t-tag"), ("after", 1, "t-tag", True),
                         ("before", 2, "t-noop"), ("after", 2, "t-noop", False), ("finish",)]


def test_finish_is_called_when_a_pass_fails():
    rec = Recorder()
    with pytest.raises(PassError):
        run("t-tag,t-break", instruments=[rec])
    assert rec.calls[-2:] == [("before", 2, "t-break"), ("finish",)]


def test_timing_table():
    timing = Timing()
    run("t-tag{label=q},t-noop", instruments=[timing])
    assert [(i, spec, changed) for i, spec, _, changed in timing.rows] == [
        (1, "t-tag{label=q}", True), (2, "t-noop", False)]
    lines = timing.render().splitlines()
    assert lines[0].split() == ["#", "pass", "time", "share", "changed"]
    assert re.fullmatch(r"\s+1\s+t-tag\{label=q\}\s+\d+\.\d ms\s+\d+\.\d%\s+yes", lines[1])
    assert re.fullmatch(r"\s+2\s+t-noop\s+\d+\.\d ms\s+\d+\.\d%\s+no", lines[2])
    assert lines[3].split()[0] == "total" and lines[3].endswith(" ms")


# -- DumpIR -------------------------------------------------------------------------------------

PIPELINE = "t-tag{label=x},t-noop,t-drop-mul-one"


def dump(tmp_path, when, diff=False, pipeline=PIPELINE):
    d = DumpIR(tmp_path / "dumps", when, diff=diff)
    run(pipeline, instruments=[d])
    return sorted(p.name for p in (tmp_path / "dumps").iterdir()), tmp_path / "dumps"


def test_after_all_dumps_every_pass_and_diffs_only_changes(tmp_path):
    names, d = dump(tmp_path, ["after:all"], diff=True)
    assert names == ["00-input.ir", "01-t-tag.diff", "01-t-tag.ir", "02-t-noop.ir",
                     "03-t-drop-mul-one.diff", "03-t-drop-mul-one.ir"]
    assert (d / "00-input.ir").read_text() == ir.print_module(tiny())
    after_tag = (d / "01-t-tag.ir").read_text()
    assert 'trail = "x"' in after_tag and "mul(" in after_tag
    assert (d / "02-t-noop.ir").read_text() == after_tag
    final = (d / "03-t-drop-mul-one.ir").read_text()
    assert "mul(" not in final
    assert ir.print_module(ir.parse_module(final)) == final          # dumps are valid IR text
    diff = (d / "03-t-drop-mul-one.diff").read_text().splitlines()
    assert diff[:2] == ["--- 02-t-noop.ir", "+++ 03-t-drop-mul-one.ir"]
    assert "-    %y = mul(%x, %one) : f32[2, 3]" in diff and "+    %z = neg(%x) : f32[2, 3]" in diff
    assert (d / "01-t-tag.diff").read_text().startswith("--- 00-input.ir\n+++ 01-t-tag.ir\n")


def test_dumps_around_one_pass(tmp_path):
    names, d = dump(tmp_path, ["before:t-drop-mul-one", "after:t-tag"])
    assert names == ["00-input.ir", "01-t-tag.ir", "03-before-t-drop-mul-one.ir"]
    assert "mul(" in (d / "03-before-t-drop-mul-one.ir").read_text()


def test_diff_of_a_pass_with_only_a_before_dump(tmp_path):
    names, d = dump(tmp_path, ["before:t-drop-mul-one"], diff=True)
    assert names == ["00-input.ir", "03-before-t-drop-mul-one.ir", "03-t-drop-mul-one.diff"]
    diff = (d / "03-t-drop-mul-one.diff").read_text()
    assert diff.startswith("--- 03-before-t-drop-mul-one.ir\n+++ IR after 03-t-drop-mul-one\n")


def test_diff_starts_from_the_ir_before_the_pass_not_the_last_dump(tmp_path):
    names, d = dump(tmp_path, ["after:t-drop-mul-one"], diff=True)
    assert names == ["00-input.ir", "03-t-drop-mul-one.diff", "03-t-drop-mul-one.ir"]
    diff = (d / "03-t-drop-mul-one.diff").read_text()
    assert diff.startswith("--- IR before 03-t-drop-mul-one\n+++ 03-t-drop-mul-one.ir\n")
    changes = [line for line in diff.splitlines()[2:] if line.startswith(("-", "+"))]
    assert changes == ["-    %y = mul(%x, %one) : f32[2, 3]", "-    %z = neg(%y) : f32[2, 3]",
                       "+    %z = neg(%x) : f32[2, 3]"]       # t-tag's change is not this pass's


def test_old_dumps_are_replaced_and_other_files_kept(tmp_path):
    (tmp_path / "dumps").mkdir()
    (tmp_path / "dumps" / "07-old-pass.ir").write_text("stale")
    (tmp_path / "dumps" / "notes.txt").write_text("mine")
    names, _ = dump(tmp_path, ["after:t-noop"])
    assert names == ["00-input.ir", "02-t-noop.ir", "notes.txt"]


def test_numbers_widen_for_long_pipelines(tmp_path):
    names, _ = dump(tmp_path, ["after:t-tag"], pipeline=",".join(["t-noop"] * 99 + ["t-tag"]))
    assert names == ["000-input.ir", "100-t-tag.ir"]


@pytest.mark.parametrize("when, message", [
    (["after:t-nope"], "dump point names pass 't-nope', which is not in the pipeline"),
    (["during:all"], "dump point 'during:all': expected before:all, after:all, before:NAME or after:NAME"),
    (["after"], "dump point 'after': expected"),
])
def test_bad_dump_points(tmp_path, when, message):
    with pytest.raises(PassError, match=re.escape(message)):
        dump(tmp_path, when)

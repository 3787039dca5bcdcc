"""Passes from outside amxc: scoped registration, `--pass-plugin` specs (files, modules,
functions), installed packages' `amxc.passes` entry points, and the errors for each.

The worked example of docs/passes.md is loaded from the page itself, so the documentation
cannot drift from what works.  The last test installs a plugin package the way pip would (a
dist-info directory on the path) and runs `amxc compile` with it in a fresh process."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import amxc.ir as ir
from amxc.api import optimize
from amxc.passes import REGISTRY, Pass, PassError, register_pass
from amxc.passes.base import current_registry
from amxc.passes.plugins import load_plugins
from amxc.runtime.artifact import load_artifact

DOCS = Path(__file__).resolve().parents[2] / "docs" / "passes.md"

WITH_PARAMS = """\
module @tiny {
  param @model.w : f32[3, 3]
  param @lm_head : f32[3, 3]
  func @forward(%x: f32[2, 3]) -> (f32[2, 3]) {
    %h = linear(%x, @model.w) : f32[2, 3]
    %y = linear(%h, @lm_head) : f32[2, 3]
    return %y
  }
}
"""


def tiny_with_weights(text: str = WITH_PARAMS) -> ir.Module:
    module = ir.parse_module(text)
    rng = np.random.default_rng(0)
    for p in module.params.values():
        p.set_data(rng.standard_normal((3, 3)).astype(np.float32))
    return module


@pytest.fixture
def docs_plugin(tmp_path) -> Path:
    """The plugin file of docs/passes.md's worked example: the code block after the marker."""
    text = DOCS.read_text()
    code = re.search(r"<!-- tests/passes/test_plugins.py .*?-->\n```python\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "my_passes.py"
    path.write_text(code)
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- registration is scoped ----------------------------------------------------------------------

def test_registration_is_scoped():
    with REGISTRY.scope():
        @register_pass("t-scoped", version=4)
        class Scoped(Pass):
            def run(self, module):
                return False
        assert current_registry().get("t-scoped") is Scoped and REGISTRY.lookup("t-scoped") is None
    assert "t-scoped" not in REGISTRY.names()


def test_a_duplicate_name_is_an_error_not_an_overwrite():
    with REGISTRY.scope(), pytest.raises(PassError, match=r"pass 'dce' is already registered \(by builtin, "
                                                           r"amxc\.passes\.dce\.DeadCodeElimination\)"):
        @register_pass("dce")
        class MyDCE(Pass):
            def run(self, module):
                return False
    assert REGISTRY.get("dce").__name__ == "DeadCodeElimination"


def test_the_api_sees_passes_registered_in_the_callers_scope():
    with REGISTRY.scope():
        @register_pass("t-mine")
        class Mine(Pass):
            def run(self, module):
                module.attrs["mine"] = True
                return True
        module = tiny_with_weights()
        assert optimize(module, "t-mine").records[0].origin == f"python:{__name__}"
    assert module.attrs["mine"] is True


# -- --pass-plugin file.py:Name: the documented example ---------------------------------------------

def test_docs_example_as_a_file_plugin(docs_plugin):
    module = tiny_with_weights()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = ir.run(module, [x])[0]
    with REGISTRY.scope():
        (cls,) = load_plugins([f"{docs_plugin}:StripParamPrefix"], entry_points=False)
        assert cls.name == "strip-param-prefix" and cls.version == 1
        assert cls.origin == f"plugin:{docs_plugin}"
        manager = optimize(module, "strip-param-prefix")
    assert list(module.params) == ["w", "lm_head"]
    assert "linear(%x, @w)" in ir.print_module(module)
    np.testing.assert_array_equal(ir.run(module, [x])[0], expected)
    assert [(r.name, r.origin, r.changed) for r in manager.records] == [
        ("strip-param-prefix", f"plugin:{docs_plugin}", True)]
    assert REGISTRY.lookup("strip-param-prefix") is None          # gone with the scope


def test_docs_example_through_the_api_plugins_argument(docs_plugin):
    module = tiny_with_weights()
    manager = optimize(module, "strip-param-prefix{prefix=lm_}", plugins=[f"{docs_plugin}:StripParamPrefix"])
    assert manager.pipeline == "strip-param-prefix{prefix=lm_}"
    assert list(module.params) == ["model.w", "head"]
    with pytest.raises(PassError, match="unknown pass 'strip-param-prefix'"):
        optimize(module, "strip-param-prefix")           # plugins live for one call


def test_docs_example_refuses_to_merge_two_parameters(docs_plugin):
    module = tiny_with_weights(WITH_PARAMS.replace("@lm_head", "@w"))
    with pytest.raises(PassError, match=re.escape(
            f"pass #1 'strip-param-prefix' (plugin:{docs_plugin}): @model.w and @w would both be called @w")):
        optimize(module, "strip-param-prefix", plugins=[str(docs_plugin)])


def test_a_file_plugin_is_read_again_on_each_load(tmp_path):
    path = tmp_path / "versioned.py"
    for version in (1, 2):
        write(path, f"from amxc.passes import Pass\n\nclass V(Pass):\n    name = 't-v'\n"
                    f"    version = {version}\n\n    def run(self, module):\n        return False\n")
        with REGISTRY.scope():
            assert [c.version for c in load_plugins([f"{path}:V"], entry_points=False)] == [version]


# -- module:Name, functions, whole modules ---------------------------------------------------------

PLUGIN_MODULE = """\
from amxc.passes import Pass, register_pass
from amxc.passes.dce import DeadCodeElimination      # imported, not defined here: not collected


@register_pass("t-alpha", version=2)
class Alpha(Pass):
    def run(self, module):
        return False


class Beta(Pass):
    name = "t-beta"

    def run(self, module):
        return False


class _Base(Pass):                                    # no name: a base class, not a pass
    pass


def both():
    return [Alpha, Beta]


def wrong():
    return 3


NOT_A_PASS = 42
"""


@pytest.fixture
def plugin_module(tmp_path, monkeypatch) -> str:
    write(tmp_path / "amxc_t_plugmod.py", PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "amxc_t_plugmod", raising=False)
    yield "amxc_t_plugmod"
    sys.modules.pop("amxc_t_plugmod", None)


@pytest.mark.parametrize("suffix, names", [(":Alpha", ["t-alpha"]), (":both", ["t-alpha", "t-beta"]),
                                           ("", ["t-alpha", "t-beta"])])
def test_module_specs(plugin_module, suffix, names):
    for _ in range(2):      # the second scope finds the module already imported: still registered
        with REGISTRY.scope() as scope:
            loaded = load_plugins([plugin_module + suffix], entry_points=False)
            assert [c.name for c in loaded] == names
            assert all(scope.lookup(n).origin == "plugin:amxc_t_plugmod" for n in names)
    assert REGISTRY.get("dce").origin == "builtin"


def test_naming_a_pass_registered_outside_the_scope_keeps_its_origin():
    with REGISTRY.scope():
        (cls,) = load_plugins(["amxc.passes.dce:DeadCodeElimination"], entry_points=False)
    assert cls is REGISTRY.get("dce") and cls.origin == "builtin"


@pytest.mark.parametrize("spec, message", [
    ("amxc_t_plugmod:Gamma", "--pass-plugin 'amxc_t_plugmod:Gamma': module 'amxc_t_plugmod' has no 'Gamma' "
                             "(passes defined there: Alpha, Beta)"),
    ("amxc_t_plugmod:wrong", "wrong() returned 3; expected a Pass subclass or a list of them"),
    ("amxc_t_plugmod:NOT_A_PASS", "42 is not a Pass subclass, a function returning passes, or a module"),
    ("amxc_t_plugmod:_Base", "needs a kebab-case name"),
    ("amxc_t_nowhere:X", "--pass-plugin 'amxc_t_nowhere:X': failed to load: ModuleNotFoundError: "
                         "No module named 'amxc_t_nowhere'"),
    ("no/such/file.py:X", "--pass-plugin 'no/such/file.py:X': no such file no/such/file.py"),
])
def test_plugin_spec_errors(plugin_module, spec, message):
    with REGISTRY.scope(), pytest.raises(PassError) as e:
        load_plugins([spec], entry_points=False)
    assert message in str(e.value)


def test_a_failing_plugin_file_is_reported_with_its_line(tmp_path):
    bad = write(tmp_path / "bad.py", "x = 1\nraise RuntimeError('boom')\n")
    with REGISTRY.scope(), pytest.raises(PassError, match=re.escape(
            f"--pass-plugin '{bad}:X': failed to load: RuntimeError: boom (bad.py:2)")):
        load_plugins([f"{bad}:X"], entry_points=False)


def test_a_plugin_taking_a_builtin_name_is_an_error_naming_both(tmp_path):
    plain = write(tmp_path / "dup.py", "from amxc.passes import Pass\n\nclass Dup(Pass):\n"
                                       "    name = 'dce'\n\n    def run(self, module):\n        return False\n")
    with REGISTRY.scope(), pytest.raises(PassError) as e:
        load_plugins([f"{plain}:Dup"], entry_points=False)
    assert str(e.value) == (f"--pass-plugin '{plain}:Dup': pass 'dce' (plugin:{plain}, amxc_plugin_dup.Dup) "
                            f"is already registered by builtin (amxc.passes.dce.DeadCodeElimination)")
    decorated = write(tmp_path / "dup2.py", "from amxc.passes import Pass, register_pass\n\n"
                                            "@register_pass('dce')\nclass Dup(Pass):\n    pass\n")
    with REGISTRY.scope(), pytest.raises(PassError, match=re.escape(
            f"--pass-plugin '{decorated}': pass 'dce' is already registered (by builtin, ")):
        load_plugins([str(decorated)], entry_points=False)


def test_two_plugins_with_one_name(tmp_path):
    code = "from amxc.passes import Pass\n\nclass Same(Pass):\n    name = 't-same'\n"
    a, b = write(tmp_path / "a.py", code), write(tmp_path / "b.py", code)
    with REGISTRY.scope(), pytest.raises(PassError) as e:
        load_plugins([f"{a}:Same", f"{b}:Same"], entry_points=False)
    assert f"pass 't-same' (plugin:{b}, amxc_plugin_b.Same) is already registered by plugin:{a} " \
           f"(amxc_plugin_a.Same)" in str(e.value)


# -- installed packages: the amxc.passes entry point ----------------------------------------------

DEMO_PLUGIN = '''\
"""amxc_demo_plugin: an installed package adding a pass through the `amxc.passes` entry point."""
from amxc.passes import Option, Pass


class DemoPass(Pass):
    """mul(x, 1.0) -> x where that keeps x's type, and the count in a module attribute."""
    name = "demo"
    version = 3
    options = {"attr": Option(str, "demo_removed", "module attribute that gets the count")}

    def run(self, module):
        removed = 0
        for fn in module.functions.values():
            replaced = {}
            for node in list(fn.nodes):
                node.inputs = [replaced.get(v, v) for v in node.inputs]
                if node.op != "mul":
                    continue
                x, c = node.inputs
                if (c.producer is not None and c.producer.op == "constant"
                        and c.producer.attrs["value"] == 1.0 and x.type == node.outputs[0].type):
                    replaced[node.outputs[0]] = x
                    fn.nodes.remove(node)
            fn.results = [replaced.get(v, v) for v in fn.results]
            removed += len(replaced)
        module.attrs[self.opts["attr"]] = removed
        return True
'''


def install_dist(root: Path, name: str, version: str, module: str, code: str, entry_points: str) -> Path:
    """What pip leaves in site-packages: the module and a dist-info directory that
    importlib.metadata reads (METADATA for name and version, entry_points.txt)."""
    root.mkdir(exist_ok=True)
    write(root / f"{module}.py", code)
    info = root / f"{module}-{version}.dist-info"
    info.mkdir()
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    write(info / "entry_points.txt", entry_points)
    return root


@pytest.fixture
def demo_dist(tmp_path) -> Path:
    return install_dist(tmp_path / "site", "amxc-demo-plugin", "0.1", "amxc_demo_plugin", DEMO_PLUGIN,
                        "[amxc.passes]\ndemo = amxc_demo_plugin:DemoPass\n")


@pytest.fixture
def on_path(monkeypatch):
    def add(root: Path, module: str):
        monkeypatch.syspath_prepend(str(root))
        monkeypatch.delitem(sys.modules, module, raising=False)
    yield add
    for name in ("amxc_demo_plugin", "amxc_broken_plugin"):
        sys.modules.pop(name, None)


def test_entry_point_plugin_is_found_and_scoped(demo_dist, on_path):
    on_path(demo_dist, "amxc_demo_plugin")
    with REGISTRY.scope() as scope:
        loaded = load_plugins()
        assert [c.__name__ for c in loaded] == ["DemoPass"]
        assert scope.get("demo").origin == "plugin:amxc-demo-plugin==0.1"
    with REGISTRY.scope() as scope:
        assert load_plugins(entry_points=False) == [] and scope.lookup("demo") is None


def test_a_broken_entry_point_names_its_distribution(tmp_path, on_path):
    root = install_dist(tmp_path / "site", "amxc-broken-plugin", "0.2", "amxc_broken_plugin",
                        "import amxc_missing_dependency\n", "[amxc.passes]\nbroken = amxc_broken_plugin:X\n")
    on_path(root, "amxc_broken_plugin")
    with REGISTRY.scope(), pytest.raises(PassError) as e:
        load_plugins()
    assert str(e.value).startswith("entry point 'broken = amxc_broken_plugin:X' of amxc-broken-plugin==0.2: "
                                   "failed to load: ModuleNotFoundError: No module named "
                                   "'amxc_missing_dependency' (amxc_broken_plugin.py:1)")


def test_entry_point_plugin_in_amxc_compile_in_a_fresh_process(demo_dist, stories_dir, tmp_path):
    art = tmp_path / "stories.amxc"
    proc = subprocess.run(
        [sys.executable, "-m", "amxc", "compile", str(stories_dir), "-o", str(art),
         "--pipeline", " demo { attr = mul_ones } ", "--dump-ir", "after:all", "--dump-ir-diff", "--timing"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(demo_dist)})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\s+1\s+demo\{attr=mul_ones\}\s+[\d.]+ ms", proc.stderr, re.M)   # --timing

    # the pass ran: its effect is in graph.ir
    graph = (art / "graph.ir").read_text()
    assert "mul_ones = 2" in graph.splitlines()[0]
    module, manifest = load_artifact(art)
    for node in module.main.nodes:
        if node.op == "mul":
            assert not any(v.producer is not None and v.producer.op == "constant"
                           and v.producer.attrs["value"] == 1.0 for v in node.inputs), node

    # ... and in the dumps, named after it
    dumps = art.parent / "stories.amxc.ir-dumps"
    assert sorted(p.name for p in dumps.iterdir()) == ["00-input.ir", "01-demo.diff", "01-demo.ir"]
    without_digests = re.sub(r' digest\("\w+"\)', "", graph)        # digests come with the weights
    assert (dumps / "01-demo.ir").read_text() == without_digests

    # ... recorded in the manifest with its version and the distribution it came from
    assert manifest["pipeline"] == "demo{attr=mul_ones}"
    (record,) = manifest["passes"]
    assert {k: record[k] for k in ("name", "spec", "version", "origin", "changed")} == {
        "name": "demo", "spec": "demo{attr=mul_ones}", "version": 3,
        "origin": "plugin:amxc-demo-plugin==0.1", "changed": True}
    assert json.loads((art / "manifest.json").read_text())["passes"] == manifest["passes"]

    # ... and it changed nothing the model computes: the traced input gives the same logits
    before = ir.parse_module((dumps / "00-input.ir").read_text())
    for name, p in before.params.items():
        p.loader = module.params[name].loader
    inputs = {"input_ids": np.arange(1, 9, dtype=np.int64)[None], "position_ids": np.arange(8)[None]}
    np.testing.assert_array_equal(ir.run(module, inputs)[0], ir.run(before, inputs)[0])

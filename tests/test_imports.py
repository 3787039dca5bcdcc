"""The import rules of docs/design.md §2, checked on every module's source (lazy imports inside
functions included) and, for the runtime, on what importing it actually loads:

    ir        imports nothing of ours
    passes    ir
    backends  ir, passes            (never runtime: the runtime calls backends, not the reverse)
    frontend  ir (and torch, onnx)
    runtime   ir, backends          (never frontend or torch: running an artifact needs no tracing)
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"ir", "passes", "backends", "frontend", "runtime"}
ALLOWED = {"ir": set(), "passes": {"ir"}, "backends": {"ir", "passes"}, "frontend": {"ir"},
           "runtime": {"ir", "backends"}}
FORBIDDEN_THIRD_PARTY = {"runtime": {"torch", "transformers", "onnx"}, "ir": {"torch", "transformers", "onnx"},
                         "passes": {"torch", "transformers"}, "backends": {"torch", "transformers"}}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`; relative ones stay in the folder."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, name in imports(path):
            parts = name.split(".")
            if parts[0] == "amxc" and len(parts) > 1 and parts[1] in OURS - {folder} \
                    and parts[1] not in ALLOWED[folder]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
            if parts[0] in FORBIDDEN_THIRD_PARTY.get(folder, ()):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_follow_the_layering(folder):
    assert violations(folder) == []


def test_the_checker_sees_a_wrong_import(tmp_path, monkeypatch):
    """The rule can fail: a backends module importing the runtime is caught, lazy or not."""
    (tmp_path / "backends").mkdir()
    (tmp_path / "backends" / "bad.py").write_text("def f():\n    from amxc.runtime.engine import Engine\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("backends") == ["backends/bad.py:2 imports amxc.runtime.engine"]


def test_running_an_artifact_loads_no_torch_and_no_frontend():
    code = ("import sys, amxc.runtime.engine, amxc.runtime.scheduler, amxc.runtime.artifact\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx')"
            " or m.startswith('amxc.frontend'))\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_importing_amxc_first_shortens_openblas_spin_unless_the_user_set_it():
    """amxc sets OPENBLAS_THREAD_TIMEOUT (read once, when numpy loads OpenBLAS) so BLAS workers do
    not spin ~0.1 s after each call on the cores its native kernels need; a user's value stays."""
    import os
    code = "import amxc, os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                                   check=True).stdout.strip()
    assert run(env) == "4"
    assert run({**env, "OPENBLAS_THREAD_TIMEOUT": "12"}) == "12"

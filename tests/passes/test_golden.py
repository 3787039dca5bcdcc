"""Golden IR tests: for each pass, IR text in -> the pass -> the expected IR text, exactly.

Each `golden/<pass>.ir` holds cases (`# CASE: ...`) run through the pipeline on its `# RUN:` line;
`golden/expected/<pass>.ir` holds the printed results.  Cases named 'must not fire' must come out
unchanged.  Every case is also run through the reference interpreter before and after, on random
inputs, so a golden file cannot bless a wrong rewrite.  Regenerate the expected files with
AMXC_UPDATE_GOLDEN=1 and read the diff.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import amxc.ir as ir
from amxc.ir.types import TensorType
from amxc.ir.formats import nf4
from amxc.passes import parse_pipeline

GOLDEN = Path(__file__).parent / "golden"
FILES = sorted(GOLDEN.glob("*.ir"))


def cases(path: Path):
    text = path.read_text()
    pipeline = re.search(r"^# RUN: (.+)$", text, re.M).group(1).strip()
    parts = re.split(r"^# CASE: (.+)$", text, flags=re.M)[1:]
    return pipeline, [(parts[i].strip(), parts[i + 1].strip() + "\n") for i in range(0, len(parts), 2)]


def run_pipeline(module, pipeline: str):
    for p in parse_pipeline(pipeline):
        p.run(module)
        ir.verify(module)
    return module


def random_inputs(fn, rng, sizes={"b": 2, "s": 6, "n": 5, "h": 3}):
    out = []
    for a in fn.args:
        shape = a.type.concrete_shape(sizes)
        if a.type.dtype.kind == "int":
            out.append(np.broadcast_to(np.arange(shape[-1]), shape).astype(np.int64).copy())
        else:
            out.append(rng.standard_normal(shape).astype(a.type.dtype.storage))
    return out


def fill_params(module, seed=0):
    """Attach seeded data (without digests, so printing is unaffected)."""
    rng = np.random.default_rng(seed)
    for p in module.params.values():
        arr = rng.standard_normal(p.type.concrete_shape({})).astype(np.float32)
        if p.type.dtype.name == "nf4":
            arr = nf4.quantize(arr, p.type.nf4_layout())
        arr = arr.astype(p.type.dtype.storage)
        p.loader = lambda arr=arr: arr


def decoded_like(before, after):
    """Weights the pipeline quantized are given to `before` as their decoded values: a
    quantized graph must compute what the float graph computes on the decoded weights.  An
    untied copy (@W.nf4, @W.q8) becomes, in `before`, a float parameter with the decoded values
    read by the nodes that read the copy in `after` (the passes keep node order)."""
    for name, p in after.params.items():
        if not p.type.is_quantized:
            continue
        arr = p.type.quant_layout().dequantize(p.load())
        if name not in before.params:
            copy = ir.Param(name, before.params[name.removesuffix(".nf4").removesuffix(".q8")].type,
                            lambda arr=arr: arr)
            before.params[name] = copy
            for fname, fn in after.functions.items():
                for n_after, n_before in zip(fn.nodes, before.functions[fname].nodes):
                    for i, v in enumerate(n_after.inputs):
                        if v is p:
                            n_before.inputs[i] = copy
        elif not before.params[name].type.is_quantized:
            before.params[name].loader = lambda arr=arr: arr


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden(path):
    pipeline, items = cases(path)
    expected_path = GOLDEN / "expected" / path.name
    outputs = []
    for title, source in items:
        rng = np.random.default_rng(0)
        before = ir.parse_module(source)
        original = ir.print_module(before)
        fill_params(before)
        after = ir.parse_module(source)
        fill_params(after)
        after = run_pipeline(after, pipeline)
        printed = ir.print_module(after)
        if "must not fire" in title:
            assert printed == original, f"{path.name}: '{title}' fired"
        if "forward" in after.functions:
            decoded_like(before, after)
            inputs = random_inputs(before.main, rng)
            want = ir.run(before, inputs)
            ways = after.attrs.get("tp", 1)
            if ways > 1:                     # sharded: every rank's results are the whole model's
                from amxc.ir.interpreter import run_ranks
                ranks = run_ranks(after, [inputs] * ways, function="forward")
            else:
                ranks = [ir.run(after, inputs, function="forward")]
            for got in ranks:
                for w, g in zip(want, got):
                    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"{path.name}: {title}")
        outputs.append(f"# CASE: {title}\n{printed}")
    text = f"# RUN: {pipeline}\n" + "".join(outputs)
    if os.environ.get("AMXC_UPDATE_GOLDEN"):
        expected_path.parent.mkdir(exist_ok=True)
        expected_path.write_text(text)
    assert expected_path.exists(), f"no expected output for {path.name}: run with AMXC_UPDATE_GOLDEN=1"
    assert text == expected_path.read_text()


def test_every_builtin_pass_has_a_golden_file():
    from amxc.passes.pipelines import DEFAULT_PIPELINE
    covered = {p.name for f in FILES for p in parse_pipeline(cases(f)[0])}
    assert set(DEFAULT_PIPELINE.split(",")) <= covered

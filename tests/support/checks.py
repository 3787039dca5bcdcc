"""Assertions shared across test folders."""
import numpy as np

import amxc.ir as ir

# Logit tolerance against HF transformers (issues #2/#3): 1e-4 max-abs.  HF's fp32 forward has
# rounding error of its own, measured against the same model run in fp64: ~1e-5 on the tiny
# models but ~1e-4 on SmolLM2-135M (30 layers, logits up to 32).  The interpreter accumulates in
# fp64, so it is held to 1e-4 against HF fp64 (the truth), and to 1e-4 plus HF fp32's own
# measured error against HF fp32.  A real bug (wrong RoPE, mask, bias) moves logits by > 1e-2.
LOGIT_TOL = 1e-4


def hf_reference_logits(model, ids, pos):
    """(fp32, fp64) logits of an HF model: the oracle and a measure of the oracle's own error."""
    import torch

    def cast(dtype):   # tensor by tensor: transformers refuses .double() on GGUF-loaded models
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(dtype)

    with torch.no_grad():
        args = dict(position_ids=torch.from_numpy(pos))
        r32 = model(torch.from_numpy(ids), **args).logits.numpy()
        cast(torch.float64)
        r64 = model(torch.from_numpy(ids), **args).logits.numpy()
        cast(torch.float32)
    return r32, r64


def assert_matches_hf(ours, ref, what: str = "") -> float:
    """`ref` = (fp32, fp64) logits from hf_reference_logits; returns max|ours - fp32|."""
    r32, r64 = ref
    d32, d64 = float(np.abs(ours - r32).max()), float(np.abs(ours - r64).max())
    hf_err = float(np.abs(r32 - r64).max())
    print(f"{what}: max|logit diff| vs HF fp32 = {d32:.2e}, vs HF fp64 = {d64:.2e} "
          f"(HF fp32's own error {hf_err:.2e}, max|logit| {np.abs(r32).max():.1f})")
    assert ours.shape == r32.shape
    assert d64 <= LOGIT_TOL
    assert d32 <= LOGIT_TOL + hf_err
    return d32


def check_roundtrip(module: ir.Module) -> None:
    """print -> parse -> print is identical and the parsed module verifies (issue #2, show 2)."""
    text = ir.print_module(module)
    parsed = ir.parse_module(text)
    ir.verify(parsed)
    assert ir.print_module(parsed) == text


def check_default_pipeline(module: ir.Module, ids, pos, hf_logits) -> None:
    """Issue #3, show 2: after the default pipeline every expected fusion fired on every layer,
    and prefill through the KV cache still gives HF's logits (same tolerance as the import)."""
    from amxc.ir.ops.cache import DenseKVCache
    from amxc.passes import DEFAULT_PIPELINE, REGISTRY
    from amxc.passes.report import fusion_report

    passes = [REGISTRY.get(name)() for name in DEFAULT_PIPELINE.split(",")]
    for p in passes:
        p.run(module)
        ir.verify(module)
    check_roundtrip(module)
    report = fusion_report(module, passes)
    print(report.render())
    assert not report.warnings(), report.warnings()
    for kind in report.expected:
        assert report.layers_with(kind) == module.attrs["num_layers"], kind
    cache = DenseKVCache(module.functions["prefill"].args[-1].type, ids.shape[0], ids.shape[1])
    logits = ir.run(module, [ids, pos, cache], function="prefill")[0]
    assert_matches_hf(logits, hf_logits, "after the default pipeline")


def mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of file `path` (/proc/self/smaps: the kernel's
    count, not the code under test's)."""
    import re
    from pathlib import Path
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total

"""Assertions shared across test folders."""
import amxc.ir as ir


def check_roundtrip(module: ir.Module) -> None:
    """print -> parse -> print is identical and the parsed module verifies (issue #2, show 2)."""
    text = ir.print_module(module)
    parsed = ir.parse_module(text)
    ir.verify(parsed)
    assert ir.print_module(parsed) == text


def check_default_pipeline(module: ir.Module, ids, pos, hf_logits, tol: float = 1e-4) -> None:
    """Issue #3, show 2: after the default pipeline every expected fusion fired on every layer,
    and prefill through the KV cache still gives HF's logits (same tolerance as the import)."""
    import numpy as np

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
    diff = float(np.abs(logits - hf_logits).max())
    print(f"after the default pipeline: max|logit diff| vs HF = {diff:.2e}")
    assert diff <= tol

"""Issue #3, show 3: prefill of N tokens then decode of M tokens one at a time through the KV
cache gives the logits of the full-sequence graph on N + M tokens (tolerance 1e-4; measured
bit-identical, since attention over cached positions does the same float64 arithmetic)."""
from __future__ import annotations

import numpy as np
import pytest

import amxc.ir as ir
from amxc.frontend.hf import import_hf_checkpoint
from amxc.ir.ops.cache import DenseKVCache
from amxc.passes import DEFAULT_PIPELINE, REGISTRY
from support.random_models import random_ids


def compile_with_forward(model_dir):
    module = import_hf_checkpoint(model_dir)
    for name in DEFAULT_PIPELINE.split(","):
        opts = {"keep_forward": True} if name == "kv-cache" else {}
        REGISTRY.get(name)(**opts).run(module)
    ir.verify(module)
    return module


@pytest.mark.parametrize("which", ["stories", "mistral", "gpt2"])
def test_prefill_then_decode_equals_full_sequence(which, stories_dir, random_models):
    module = compile_with_forward(stories_dir if which == "stories" else random_models[which])
    n, m, batch = 20, 12, 2     # 32 tokens > mistral's sliding window of 12
    ids = np.concatenate([random_ids(module.attrs["vocab_size"], n + m, seed=s) for s in range(batch)])
    pos = np.broadcast_to(np.arange(n + m), (batch, n + m)).copy()
    full = ir.run(module, {"input_ids": ids, "position_ids": pos}, function="forward")[0]
    cache = DenseKVCache(module.functions["prefill"].args[-1].type, batch, capacity=64)
    steps = [ir.run(module, [ids[:, :n], pos[:, :n], cache], function="prefill")[0]]
    for t in range(n, n + m):
        steps.append(ir.run(module, [ids[:, t:t + 1], pos[:, t:t + 1], cache], function="decode")[0])
    diff = float(np.abs(np.concatenate(steps, axis=1) - full).max())
    print(f"{which}: max|prefill+decode - full| = {diff:.2e}")
    assert diff <= 1e-4


def test_cache_overflow_is_a_clear_error(stories_dir):
    module = compile_with_forward(stories_dir)
    cache = DenseKVCache(module.functions["prefill"].args[-1].type, 1, capacity=4)
    ids = np.ones((1, 6), dtype=np.int64)
    with pytest.raises(ir.InterpreterError, match="outside the KV cache"):
        ir.run(module, [ids, np.arange(6)[None], cache], function="prefill")

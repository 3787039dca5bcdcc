"""pad-ffn on a real checkpoint: stories260K's 172-unit MLPs become 192 wide with zero units.
The float function must not change (the padded products are exact zeros; only the summation
order of a BLAS over 192 instead of 172 terms may move the last bit: bound 1e-5 of logits of
magnitude ~10), the padding must survive quantization as exact zeros, and the compile pipeline
must place the pass where its widths matter (before shard-tp and the quantizers).  The golden
file (golden/pad-ffn.ir) pins the rewrite on toy SwiGLU and GELU blocks."""
from __future__ import annotations

import numpy as np
import pytest

from amxc.api import compile_pipeline, optimize, trace
from amxc.ir import Param, TensorType
from amxc.ir.dtypes import f32
from amxc.ir.interpreter import run
from amxc.passes import PassError
from amxc.passes.pad_ffn import PadFFN, true_numel
from amxc.passes.quantize_nf4 import QuantizeNF4

GRAPH = "canonicalize,fold-constants,cse,dce,fuse-rms-norm,fuse-rope,fuse-attention,fuse-swiglu,dce"


def _graph(stories_dir):
    module = trace(stories_dir)
    optimize(module, GRAPH)
    return module


def _logits(module, ids):
    return run(module, {"input_ids": ids, "position_ids": np.arange(ids.shape[1])[None]})[0]


def test_padding_keeps_a_real_models_function_and_counts(stories_dir):
    module = _graph(stories_dir)
    ids = np.random.default_rng(0).integers(0, 512, (1, 40))
    before = _logits(module, ids)
    counts = {n: p.type.numel() for n, p in module.params.items()}
    pad = PadFFN()
    assert pad.run(module)
    assert len(pad.padded) == 15 and set(pad.padded.values()) == {(172, 192)} and not pad.skipped
    down = module.params["model.layers.0.mlp.down_proj.weight"]
    assert down.type.shape == (64, 192) and not down.load()[:, 172:].any()
    assert module.params["model.layers.0.mlp.gate_proj.weight"].type.shape == (192, 64)
    assert {n: true_numel(p) for n, p in module.params.items()} == counts
    assert np.abs(_logits(module, ids) - before).max() <= 1e-5
    assert not PadFFN().run(module)                   # idempotent: 192 fits


def test_padding_decodes_to_exact_zeros_after_nf4(stories_dir):
    module = _graph(stories_dir)
    PadFFN().run(module)
    q = QuantizeNF4(method="rtn")
    q.run(module)
    down = module.params["model.layers.2.mlp.down_proj.weight"]
    assert down.type.dtype.name == "nf4" and list(down.attrs["padded_from"]) == [64, 172]
    decoded = down.type.nf4_layout().dequantize(down.load())
    assert not decoded[:, 172:].any() and decoded[:, :172].any()
    up = module.params["model.layers.2.mlp.up_proj.weight"]
    assert not up.type.nf4_layout().dequantize(up.load())[172:].any()
    assert not any("mlp" in name for name in q.skipped)


def test_a_sharded_module_is_refused(stories_dir):
    module = _graph(stories_dir)
    module.attrs["tp"] = 2
    with pytest.raises(PassError, match="pad before shard-tp"):
        PadFFN().run(module)
    with pytest.raises(PassError, match="multiple=0"):
        PadFFN(multiple=0).run(_graph(stories_dir))


@pytest.mark.parametrize("quant, tp, expect", [
    (None, 1, None),
    ("nf4", 1, "kv-cache,pad-ffn,quantize-nf4,lower"),
    ("w8a8", 2, "kv-cache,pad-ffn,shard-tp{ways=2},quantize-int8,lower"),
])
def test_compile_pads_before_sharding_and_quantizing(quant, tp, expect):
    pipeline = compile_pipeline(quant=quant, tp=tp)
    if expect is None:
        assert "pad-ffn" not in pipeline              # float weights take any width
    else:
        assert pipeline.endswith(expect)


@pytest.mark.parametrize("claim", [[64, 999], ["64", 172], [64], 7, [True, 172], [-1, 172]])
def test_a_padded_from_that_is_not_a_smaller_shape_is_not_trusted(claim):
    """Counts read `padded_from` from IR text a user may hand in: a claim that is not ints of the
    type's rank within its shape counts the type's elements instead (and never raises)."""
    p = Param("w", TensorType(f32, (64, 192)), attrs={"padded_from": claim})
    assert true_numel(p) == 64 * 192
    assert true_numel(Param("w", TensorType(f32, (64, 192)), attrs={"padded_from": [64, 172]})) == 64 * 172


def test_without_pad_ffn_the_skip_reason_names_it(stories_dir):
    module = _graph(stories_dir)
    q = QuantizeNF4(method="rtn")
    q.run(module)
    why = q.skipped["model.layers.0.mlp.down_proj.weight"]
    assert why == "input size 172 is not a multiple of block 64 (pad-ffn widens a fused MLP's hidden layer to fit)"

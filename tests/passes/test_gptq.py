"""quantize-nf4{method=gptq}: GPTQ error compensation for NF4 (issue #5, quality).  The format
is unchanged (ordinary nf4 parameters); what changes is which codes and scales are chosen."""
from __future__ import annotations

import numpy as np
import pytest

from amxc.cli import main
from amxc.frontend.hf import import_hf_checkpoint
from amxc.ir.formats import nf4
from amxc.passes import PassError, parse_pipeline
from amxc.passes.gptq import quantize_gptq
from amxc.runtime.engine import Engine


@pytest.mark.parametrize("scale", ["fp8_e4m3", "f32"])
def test_gptq_beats_round_to_nearest_on_the_calibration_inputs(scale):
    rng = np.random.default_rng(0)
    n, k = 48, 256
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)          # correlated input features
    x = (rng.standard_normal((512, k)) @ mix).astype(np.float32)
    layout = nf4.Layout((n, k), 64, scale, 256)
    h = x.astype(np.float64).T @ x.astype(np.float64)
    gptq = layout.dequantize(quantize_gptq(w, h, layout))
    rtn = layout.dequantize(nf4.quantize(w, layout))
    out = lambda ww: x.astype(np.float64) @ ww.T.astype(np.float64)
    err = lambda ww: float(np.linalg.norm(out(ww) - out(w)) / np.linalg.norm(out(w)))
    print(f"{scale}: layer output error rtn {err(rtn):.4f}, gptq {err(gptq):.4f}")
    assert err(gptq) < 0.8 * err(rtn)


def test_gptq_needs_calibration_and_a_supported_scale(stories_dir, tmp_path):
    module = import_hf_checkpoint(stories_dir)
    with pytest.raises(PassError, match="needs calibration tokens"):
        for p in parse_pipeline("quantize-nf4{method=gptq}"):
            p.run(module)
    np.save(tmp_path / "ids.npy", np.ones((1, 8), np.int64))
    with pytest.raises(PassError, match="double=fp8 or double=none"):
        for p in parse_pipeline(f'quantize-nf4{{method=gptq,double=bnb,calib="{tmp_path / "ids.npy"}"}}'):
            p.run(module)
    np.save(tmp_path / "bad.npy", np.ones(8, np.float32))
    with pytest.raises(PassError, match=r"must hold int64 \[sequences, tokens\]"):
        for p in parse_pipeline(f'quantize-nf4{{method=gptq,calib="{tmp_path / "bad.npy"}"}}'):
            p.run(module)


def test_gptq_compile_lowers_held_out_perplexity(stories_dir, shared_eval, tmp_path):
    text = (shared_eval / "tinystories_dev.txt").read_text()
    calib = tmp_path / "calib.txt"
    calib.write_text(text[len(text) // 2:])                        # calibrate on the second half
    rtn, gptq = tmp_path / "rtn.amxc", tmp_path / "gptq.amxc"
    assert main(["compile", str(stories_dir), "-o", str(rtn), "--quant", "nf4", "-q"]) == 0
    assert main(["compile", str(stories_dir), "-o", str(gptq), "--quant", "nf4{method=gptq}",
                 "--calib", str(calib), "--calib-tokens", "2048", "-q"]) == 0
    held_out = text[:8000]                                         # ...and measure on the first
    p_rtn, p_gptq = (Engine.load(a).perplexity(held_out, window=256, stride=256).perplexity for a in (rtn, gptq))
    print(f"stories260K held-out perplexity: rtn {p_rtn:.3f}, gptq {p_gptq:.3f}")
    assert p_gptq < p_rtn
    assert 'method = "gptq"' in (gptq / "graph.ir").read_text()

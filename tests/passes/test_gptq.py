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


def test_toward_float_target_undoes_input_error():
    """With inputs X perturbed from the float inputs X_f, aiming at W X_f (toward_float=1)
    quantizes to a layer whose outputs are closer to the float outputs than plain GPTQ's."""
    from amxc.passes.gptq import toward_float
    rng = np.random.default_rng(1)
    n, k = 32, 128
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    xf = rng.standard_normal((2048, k))
    x = xf @ (np.eye(k) + 0.5 * rng.standard_normal((k, k)) / np.sqrt(k))   # systematic input drift
    h, c = x.T @ x, x.T @ xf
    layout = nf4.Layout((n, k), 64, "fp8_e4m3", 256)
    err = lambda ww: float(np.linalg.norm(x @ ww.T - xf @ w.T.astype(np.float64)))
    plain = layout.dequantize(quantize_gptq(w, h, layout))
    aimed = layout.dequantize(quantize_gptq(toward_float(w, h, c, 1.0), h, layout))
    assert np.array_equal(toward_float(w, h, c, 0.0), w.astype(np.float64))
    print(f"error vs float outputs: plain {err(plain):.4f}, toward float {err(aimed):.4f}")
    assert err(aimed) < 0.9 * err(plain)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_codes_decode_to_weights_near_the_original(act_order):
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((16, 192)) * 0.05).astype(np.float32)
    x = rng.standard_normal((512, 192)) * np.linspace(0.1, 3, 192)      # uneven input energy
    layout = nf4.Layout(w.shape, 64, "fp8_e4m3", 256)
    q = layout.dequantize(quantize_gptq(w, x.T @ x, layout, act_order=act_order))
    rtn = layout.dequantize(nf4.quantize(w, layout))
    out = lambda ww: np.linalg.norm(x @ (ww - w).T)
    assert out(q) < out(rtn)
    assert np.abs(q - w).max() < 4 * np.abs(rtn - w).max()

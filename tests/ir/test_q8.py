"""q8 in the IR: the typed parameter and its text form, the linear_q8 reference against torch on
the decoded weight, and the errors a malformed q8 type gets (ir/formats/q8.py)."""
from __future__ import annotations

import numpy as np
import pytest

import amxc.ir as ir
from amxc.ir.formats import q8

TEXT = """module @m {
  param @w : q8[32, 128]{block=64} digest("00") attributes {rel_rms = 0.006, max_abs = 0.001}
  param @b : f32[32]
  func @forward(%x: f32[b, 128]) -> (f32[b, 32]) {
    %y = linear_q8(%x, @w, @b) : f32[b, 32]
    return %y
  }
}
"""


def test_q8_parameter_round_trips():
    m = ir.parse_module(TEXT)
    ir.verify(m)
    assert ir.print_module(m) == TEXT
    w = m.params["w"]
    assert w.type.quant_layout().sections() == {"codes": (0, 4096), "scales": (4096, 256)}
    assert w.type.nbytes() == 4352 and w.type.storage_shape() == (4352,)


@pytest.mark.parametrize("encoding, message", [
    ("{block=32}", "q8 block must be 64"),
    ("{block=64, pack=r8}", "pack 'r8' is not one of"),
    ("{block=64, scale=f32}", "unknown encoding field 'scale'"),
])
def test_bad_q8_encoding_is_a_located_parse_error(encoding, message):
    with pytest.raises(ir.ParseError, match=message) as e:
        ir.parse_module(TEXT.replace("{block=64}", encoding))
    assert (e.value.line, e.value.col) == (2, 14)


def test_a_q8_weight_needs_k_a_multiple_of_64():
    with pytest.raises(ir.ParseError, match="multiple of 64"):
        ir.parse_module(TEXT.replace("q8[32, 128]", "q8[32, 100]"))


def test_linear_with_a_q8_weight_is_rejected_by_the_verifier():
    with pytest.raises(ir.VerifyError, match="must share one dtype"):
        ir.verify(ir.parse_module(TEXT.replace("linear_q8(", "linear(")))


def test_linear_q8_equals_torch_on_the_decoded_weight():
    import torch
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 128)) * 0.05).astype(np.float32)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    m = ir.parse_module(TEXT)
    layout = m.params["w"].type.quant_layout()
    m.params["w"].set_data(q8.quantize(w, layout))
    m.params["b"].set_data(bias)
    decoded = layout.dequantize(m.params["w"].load())
    assert np.abs(decoded - w).max() <= np.abs(w).max() / 254 * (1 + 1e-6)
    want = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(decoded), torch.from_numpy(bias)).numpy()
    np.testing.assert_allclose(ir.run(m, [x])[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pack", q8.PACKS)
def test_quantize_gives_the_absmax_codes_whatever_rows_it_takes_at_a_time(pack, monkeypatch):
    """quantize() works QUANTIZE_ROWS rows at a time (a tied head's float temporaries were 0.1 GB
    each); the bytes are those of each block's rint(127 x / absmax), a zero block all zeros, over
    rows that straddle the slices (here 7 rows at a time, 37 rows: a short last slice)."""
    monkeypatch.setattr(q8, "QUANTIZE_ROWS", 7)
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((37, 128)) * rng.uniform(0.01, 5, (37, 1))).astype(np.float32)
    w[6, :64] = 0.0                                               # a zero block at a slice's end
    layout = q8.Layout((37, 128), pack=pack)
    blob = q8.quantize(w, layout)
    absmax = np.abs(w.reshape(37, 2, 64)).max(axis=2)
    inv = np.where(absmax > 0, np.float32(127) / np.where(absmax > 0, absmax, 1), 0).astype(np.float32)
    want = np.rint(w.reshape(37, 2, 64) * inv[..., None])
    assert np.array_equal(layout.codes(blob), want.reshape(37, 128).astype(np.int8))
    assert np.array_equal(layout.block_scales(blob), absmax)
    assert not layout.codes(blob)[6, :64].any()


@pytest.mark.parametrize("pack", ["flat", "r16k4"])
def test_dequantize_is_code_times_its_block_absmax_over_127(pack):
    """Against the plain formula, each element on its own (the kernel scales in place with
    broadcast block scales): a scale applied to the wrong block or row fails it."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((37, 192)) * rng.uniform(0.1, 3, (37, 1))).astype(np.float32)
    layout = q8.Layout(w.shape, pack=pack)
    blob = q8.quantize(w, layout)
    codes, scales = layout.codes(blob), layout.block_scales(blob)
    expected = np.empty_like(w)
    for n in range(w.shape[0]):
        for k in range(w.shape[1]):
            expected[n, k] = np.float32(codes[n, k]) * np.float32(scales[n, k // 64] / np.float32(127))
    assert np.array_equal(layout.dequantize(blob).view(np.uint32), expected.view(np.uint32))

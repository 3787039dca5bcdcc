"""NF4 in the IR: the typed parameter, its text form, the linear_nf4 reference against
bitsandbytes + torch, and the errors a malformed nf4 type gets."""
from __future__ import annotations

import numpy as np
import pytest

import amxc.ir as ir
from amxc.ir.formats import nf4

TEXT = """module @m {
  param @w : nf4[32, 128]{block=64, scale=fp8_e4m3, scale_block=256} digest("00") attributes {rel_rms = 0.0925, max_abs = 0.01}
  param @b : f32[32]
  func @forward(%x: f32[b, 128]) -> (f32[b, 32]) {
    %y = linear_nf4(%x, @w, @b) : f32[b, 32]
    return %y
  }
}
"""


def test_nf4_parameter_round_trips_with_its_attributes():
    m = ir.parse_module(TEXT)
    ir.verify(m)
    assert ir.print_module(m) == TEXT
    w = m.params["w"]
    assert w.attrs == {"rel_rms": 0.0925, "max_abs": 0.01}
    layout = w.type.nf4_layout()
    # codes 2048 B, E4M3 scales 64 B, one fp32 second-level scale
    assert layout.sections() == {"codes": (0, 2048), "scales": (2048, 64), "scales2": (2112, 4)}
    assert w.type.nbytes() == 2116 and w.type.storage_shape() == (2116,)


@pytest.mark.parametrize("encoding, message", [
    ('{block=48, scale=f32}', "block 48 is not one of"),
    ('{block=64, scale=int8}', "scale 'int8' is not one of"),
    ('{block=64, scale=f32, scale_block=256}', "no scale_block"),
    ('{block=64, colour=1}', "unknown encoding field 'colour'"),
])
def test_bad_nf4_encoding_is_a_located_parse_error(encoding, message):
    text = TEXT.replace('{block=64, scale=fp8_e4m3, scale_block=256}', encoding)
    with pytest.raises(ir.ParseError, match=message) as e:
        ir.parse_module(text)
    assert (e.value.line, e.value.col) == (2, 14)      # the type, at "nf4"


def test_linear_with_an_nf4_weight_is_rejected_by_the_verifier():
    m = ir.parse_module(TEXT.replace("linear_nf4(", "linear("))
    with pytest.raises(ir.VerifyError, match="must share one dtype"):
        ir.verify(m)


@pytest.mark.parametrize("scheme", nf4.SCALES)
def test_linear_nf4_equals_torch_on_the_decoded_weight(scheme):
    import torch
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 128)) * 0.05).astype(np.float32)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    m = ir.parse_module(TEXT.replace('scale=fp8_e4m3, scale_block=256', f'scale="{scheme}"'
                                     + (", scale_block=256" if scheme != "f32" else "")))
    layout = m.params["w"].type.nf4_layout()
    m.params["w"].set_data(nf4.quantize(w, layout))
    m.params["b"].set_data(bias)
    ours = ir.run(m, [x])[0]
    want = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(layout.dequantize(m.params["w"].load())),
                                      torch.from_numpy(bias)).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
    if scheme == "f32":     # the decoded weight itself is bitsandbytes' dequantize_4bit
        import bitsandbytes.functional as F    # the oracle (a dev requirement): never skipped
        packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                        compress_statistics=False)
        assert (F.dequantize_4bit(packed, state).numpy() == layout.dequantize(m.params["w"].load())).all()


def test_wrong_storage_size_is_named():
    m = ir.parse_module(TEXT)
    m.params["w"].loader = lambda: np.zeros(100, np.uint8)
    with pytest.raises(ValueError, match=r"@w: data is uint8\[100\], type says nf4\[32, 128\]"):
        m.params["w"].load()

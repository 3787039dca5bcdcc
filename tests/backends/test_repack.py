"""The lower pass's r16k4 repack of NF4 weights against the flat (bitsandbytes-order) layout it
comes from, independently of the kernels (whose tests also take their oracle from the flat
bytes, tests/support/native.py nf4_weight):

  * the repacked bytes are exactly what ir/formats/nf4.py's description of r16k4 says, built
    here element by element from the flat bytes (padding rows: code 7, scale 0);
  * repack then dequantize equals the flat dequantization BIT FOR BIT (and so do the codes and
    block scales), for N a multiple of 16 or not, several blocks and scale groups per row or
    groups straddling rows, and scales fp8_e4m3 / bnb_dynamic8 / f32;
  * repacking back to flat restores the original bytes;
  * weights r16k4 cannot hold (K not a multiple of the 64 block, other blocks) are refused by
    the layout and stored by lower as the flat dequantization, bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest

from amxc.backends import lower
from amxc.ir.core import Param
from amxc.ir.dtypes import nf4 as NF4
from amxc.ir.formats import nf4
from amxc.ir.types import TensorType

SCALES = ["fp8_e4m3", "bnb_dynamic8", "f32"]
# (N, K, scale_block): N = 16, N padded (37, 1, 50, 33), one and several 64-blocks per row,
# scale groups of 7 and 4 blocks that straddle rows and leave a short last group
SHAPES = [(16, 64, 256), (37, 128, 256), (1, 64, 256), (50, 640, 7), (33, 192, 4)]


def weight(n, k, seed=0):
    w = (np.random.default_rng(seed).standard_normal((n, k)) * 0.05).astype(np.float32)
    w[0, min(5, k - 1)] = 3.0                    # an outlier block
    if n > 2:
        w[2] = 0.0                               # all-zero blocks (absmax 0)
    return w


def quantized(n, k, scale, scale_block, block=64, seed=0):
    flat = nf4.Layout((n, k), block, scale, scale_block if scale != "f32" else 0)
    return nf4.quantize(weight(n, k, seed), flat), flat


def lowered(orig, flat):
    """What the lower pass makes of the weight: (bytes, layout from the new type's encoding)."""
    p = Param("w", TensorType(NF4, flat.shape, flat.encoding()), loader=lambda: orig.copy())
    q = lower._repacked(p, flat)
    return q.load(), q.type.nf4_layout()


def bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def flat_codes(orig, flat):
    """One code per element from the flat bytes: element 2i is the HIGH nibble of byte i."""
    raw = orig[:-(-flat.numel // 2)]
    return np.stack([raw >> 4, raw & 0xF], axis=1).reshape(-1)[:flat.numel].reshape(flat.shape)


def spec_r16k4(orig, flat):
    """The r16k4 bytes as nf4.py documents them, element by element (no reshapes shared with
    the library): codes [group][block] of 512 bytes, chunk j at byte 4r + t holding row r's
    code at k = 4j + t (low nibble) and k = 4(j + 8) + t (high); then the scales [group][block]
    [16 rows] (E4M3 codes, or f32 values); then the flat second-level scales."""
    n, k = flat.shape
    groups, nb = -(-n // 16), k // 64
    codes = flat_codes(orig, flat)
    out = np.zeros(groups * nb * 512, np.uint8)
    for g in range(groups):
        for b in range(nb):
            for j in range(8):
                for r in range(16):
                    for t in range(4):
                        row = 16 * g + r
                        lo = codes[row, 64 * b + 4 * j + t] if row < n else 7
                        hi = codes[row, 64 * b + 4 * (j + 8) + t] if row < n else 7
                        out[(g * nb + b) * 512 + 64 * j + 4 * r + t] = lo | (hi << 4)
    if flat.scale == "fp8_e4m3":
        per_block, dtype = flat.split(orig)["scales"].reshape(n, nb), np.uint8
    else:                                        # f32, and bitsandbytes scales decoded to f32
        per_block, dtype = flat.block_scales(orig).reshape(n, nb), np.float32
    scales = np.zeros(groups * nb * 16, dtype)
    for g in range(groups):
        for b in range(nb):
            for r in range(16):
                if 16 * g + r < n:
                    scales[(g * nb + b) * 16 + r] = per_block[16 * g + r, b]
    parts = [out, scales.view(np.uint8)]
    if flat.scale == "fp8_e4m3":
        parts.append(flat.split(orig)["scales2"].view(np.uint8))
    return np.concatenate(parts)                 # every section is a multiple of 4 bytes


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n, k, scale_block", SHAPES)
def test_r16k4_bytes_follow_the_documented_layout(n, k, scale_block, scale):
    orig, flat = quantized(n, k, scale, scale_block)
    blob, layout = lowered(orig, flat)
    assert layout.pack == "r16k4" and layout.scale == ("f32" if scale == "bnb_dynamic8" else scale)
    want = spec_r16k4(orig, flat)
    assert blob.dtype == np.uint8 and blob.size == want.size == layout.nbytes
    bad = np.flatnonzero(blob != want)
    assert bad.size == 0, f"{bad.size} bytes differ from the documented r16k4 layout, first at {bad[:8]}"


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("n, k, scale_block", SHAPES)
def test_repack_then_dequantize_equals_the_flat_dequantization_bit_for_bit(n, k, scale_block, scale):
    orig, flat = quantized(n, k, scale, scale_block)
    blob, layout = lowered(orig, flat)
    assert np.array_equal(layout.codes(blob), flat_codes(orig, flat).reshape(-1))
    assert np.array_equal(bits(layout.block_scales(blob)), bits(flat.block_scales(orig)))
    got, want = bits(layout.dequantize(blob)), bits(flat.dequantize(orig))
    assert got.shape == want.shape == (n, k)
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{len(bad)} weights differ after repack, first at [n, k] = {bad[:4].tolist()}"


@pytest.mark.parametrize("scale", ["fp8_e4m3", "f32"])
@pytest.mark.parametrize("n, k, scale_block", SHAPES)
def test_repack_back_to_flat_restores_the_original_bytes(n, k, scale_block, scale):
    orig, flat = quantized(n, k, scale, scale_block)
    blob, layout = lowered(orig, flat)
    back, back_layout = nf4.repack(blob, layout, "flat")
    assert back_layout == flat
    assert np.array_equal(back, orig)


@pytest.mark.parametrize("n, k, block, scale", [(37, 100, 64, "fp8_e4m3"), (16, 200, 64, "bnb_dynamic8"),
                                                (20, 256, 128, "f32"), (5, 96, 32, "fp8_e4m3")])
def test_weights_r16k4_cannot_hold_are_lowered_to_the_flat_dequantization(n, k, block, scale):
    """K not a multiple of the 64 block (blocks straddle rows, bitsandbytes order) or another
    block size: r16k4 refuses, and lower stores the weight decoded, equal to the flat bits."""
    orig, flat = quantized(n, k, scale, 256, block=block)
    with pytest.raises(ValueError, match="r16k4 needs block 64"):
        nf4.Layout((n, k), block, "f32", 0, "r16k4")
    p = Param("w", TensorType(NF4, flat.shape, flat.encoding()), loader=lambda: orig.copy())
    decoded = lower._decoded(p, flat)
    assert decoded.type.dtype.name == "f32"
    assert np.array_equal(bits(decoded.load()), bits(flat.dequantize(orig)))

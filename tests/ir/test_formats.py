"""The quantized number formats bit by bit (issue #5, shows 1 and 2).

Oracles, each independent of ir/formats: a scalar re-statement of bitsandbytes' rules written
from its documented behaviour (per-element loops, the CUDA decision tree's strict '>' against
the float32 midpoints, the decimal table from bitsandbytes' source), ml_dtypes' float8_e4m3fn,
and the bitsandbytes package itself (0.50, CPU build; its quantize_4bit runs the default
backend, its nested blockwise quantizer a C kernel)."""
from __future__ import annotations

import numpy as np
import pytest

from amxc.ir.formats import bf16, dynamic8, e4m3, nf4

F32 = np.float32
# bitsandbytes functional.py get_4bit_type("nf4"), as printed there
NF4_DECIMAL = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
               -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
               0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
               0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


# -- the scalar re-statement --------------------------------------------------------------------
def scalar_nearest(x: F32, table: list[float]) -> int:
    """Count of float32 midpoints strictly below x: CUDA's dQuantize decision tree."""
    t = [F32(v) for v in table]
    mids = [F32((t[i] + t[i + 1]) / F32(2)) for i in range(len(t) - 1)]
    return sum(1 for m in mids if x > m)


def scalar_blockwise(values, block: int, table: list[float]):
    """(codes, absmax) element by element: reciprocal multiply for full blocks, division for the
    tail block, clamp to [-1, 1], nearest code with ties to the lower one."""
    codes, absmaxes = [], []
    for start in range(0, len(values), block):
        chunk = [F32(v) for v in values[start:start + block]]
        am = F32(max(abs(v) for v in chunk))
        absmaxes.append(am)
        tail = len(chunk) < block
        r = F32(1) / max(am, F32(1e-38))
        for v in chunk:
            s = F32(v / max(am, F32(1e-38))) if tail else F32(v * r)
            codes.append(scalar_nearest(F32(min(max(s, F32(-1)), F32(1))), table))
    return codes, absmaxes


def scalar_nf4(w: np.ndarray, scheme: str, block=64, scale_block=256):
    flat = [F32(v) for v in w.reshape(-1)]
    if scheme in ("f32", "bnb_dynamic8"):
        codes, absmax = scalar_blockwise(flat, block, NF4_DECIMAL)
        if scheme == "f32":
            return codes, absmax, None, None
        offset = F32(np.mean(np.asarray(absmax, np.float64)))
        q, am2 = scalar_blockwise([F32(a - offset) for a in absmax], scale_block, list(dynamic8.MAP))
        return codes, q, am2, offset
    # fp8_e4m3: scales first, then codes against the decoded scales
    absmax = [F32(max(abs(v) for v in flat[i:i + block])) for i in range(0, len(flat), block)]
    groups = [F32(max(absmax[i:i + scale_block]) / F32(448)) for i in range(0, len(absmax), scale_block)]
    q, dec = [], []
    for i, am in enumerate(absmax):
        s2 = groups[i // scale_block]
        ratio = F32(am / s2) if s2 > 0 else F32(0)
        c = scalar_e4m3(ratio)
        q.append(c)
        dec.append(F32(F32(e4m3.DECODE[c]) * s2))
    codes, tail_start = [], len(flat) - len(flat) % block
    for i, v in enumerate(flat):
        d = max(dec[i // block], F32(1e-38))
        s = F32(v / d) if i >= tail_start else F32(v * (F32(1) / d))
        codes.append(scalar_nearest(F32(min(max(s, F32(-1)), F32(1))), NF4_DECIMAL))
    return codes, q, groups, None


def scalar_e4m3(x: F32) -> int:
    """Nearest E4M3FN code of a non-negative value, ties to even, saturating at 448, from the
    format's definition: 2^(e-7) * (1 + m/8), subnormals m/8 * 2^-6."""
    values = [(m / 8) * 2.0 ** -6 for m in range(8)] + \
             [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8)][:-1]   # drop NaN
    x = min(float(x), 448.0)
    best = min(range(len(values)), key=lambda c: (abs(values[c] - x), c % 2))
    return best


ADVERSARIAL = {
    "zeros": np.zeros((2, 64), F32),
    "constant blocks": np.full((2, 128), F32(0.37)),
    "negative constant": np.full((1, 64), F32(-2.5)),
    "exact midpoints": (np.tile(np.r_[nf4.MIDPOINTS, F32(1)], 4) * F32(1)).reshape(1, 64).astype(F32),
    "midpoints scaled": (np.tile(np.r_[nf4.MIDPOINTS, F32(-1)], 8) * F32(0.5)).reshape(2, 64).astype(F32),
    "one spike": np.eye(4, 64, 5, dtype=F32) * F32(1e4),
    "tail block": np.random.default_rng(1).standard_normal((3, 50)).astype(F32),
    "odd count": np.random.default_rng(2).standard_normal((1, 77)).astype(F32),
    "tiny values": np.random.default_rng(3).standard_normal((2, 64)).astype(F32) * F32(1e-30),
}


def cases():
    rng = np.random.default_rng(0)
    out = {f"gaussian {s}": (rng.standard_normal(s) * 0.02).astype(F32) for s in [(8, 64), (5, 128)]}
    out["student-t"] = rng.standard_t(4, (16, 256)).astype(F32)
    return {**out, **ADVERSARIAL}


@pytest.mark.parametrize("scheme", nf4.SCALES)
@pytest.mark.parametrize("name", list(cases()))
def test_nf4_equals_scalar_restatement(name, scheme):
    w = cases()[name]
    layout = nf4.Layout(w.shape, 64, scheme, 256)
    parts = layout.split(nf4.quantize(w, layout))
    codes, scales, scales2, offset = scalar_nf4(w, scheme)
    assert nf4.unpack(parts["codes"], w.size).tolist() == codes
    assert parts["scales"].tolist() == [float(s) for s in scales]
    if scales2 is not None:
        assert parts["scales2"].tolist() == [float(s) for s in scales2]
    if offset is not None:
        assert parts["offset"][0] == offset


def test_packing_puts_the_first_element_in_the_high_nibble():
    assert nf4.pack([1, 2, 15, 0, 3]).tolist() == [0x12, 0xF0, 0x37]
    assert nf4.unpack(nf4.pack(np.arange(16)), 16).tolist() == list(range(16))


def test_ties_go_to_the_lower_code():
    assert nf4.nearest_code(nf4.MIDPOINTS).tolist() == list(range(15))
    assert nf4.nearest_code(np.nextafter(nf4.MIDPOINTS, F32(2))).tolist() == list(range(1, 16))


def test_nearest_code_by_table_equals_the_midpoint_search():
    """The cell table (nf4._BELOW) must give searchsorted's code for every float32, midpoints,
    their neighbours, cell edges and values outside [-1, 1] included."""
    rng = np.random.default_rng(3)
    edges = np.arange(-512, 513, dtype=np.float64) / 256
    x = np.concatenate([rng.uniform(-1.5, 1.5, 1 << 20), rng.standard_normal(1 << 16) * 1e-3, edges,
                        np.nextafter(edges, 2), np.nextafter(edges, -2), nf4.MIDPOINTS,
                        np.nextafter(nf4.MIDPOINTS, F32(2)), np.nextafter(nf4.MIDPOINTS, F32(-2)),
                        [-1e30, -1.0, -0.0, 0.0, 1.0, 1e30]]).astype(F32)
    want = np.searchsorted(nf4.MIDPOINTS, x, side="left")
    assert nf4.nearest_code(x).dtype == np.uint8
    assert np.array_equal(nf4.nearest_code(x), want)


def test_table_is_bitsandbytes_table():
    assert nf4.TABLE.tolist() == [float(F32(v)) for v in NF4_DECIMAL]


# -- E4M3 -----------------------------------------------------------------------------------
def test_e4m3_decode_all_256_codes():
    import ml_dtypes as ml            # the oracle (a dev requirement): never skipped
    ref = np.arange(256, dtype=np.uint8).view(ml.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(np.isnan(ref), np.isnan(e4m3.DECODE))
    assert np.isnan(e4m3.DECODE).sum() == 2                     # 0x7f and 0xff
    finite = ~np.isnan(ref)
    assert (ref[finite] == e4m3.DECODE[finite]).all()
    assert e4m3.DECODE[0x7E] == 448 and e4m3.DECODE[1] == 2.0 ** -9


def test_e4m3_encode_round_trips_every_finite_code():
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    assert (e4m3.encode(e4m3.DECODE[codes]) == codes).all()


def test_e4m3_encode_ties_to_even_and_saturates():
    v = e4m3.DECODE[:0x7F].astype(np.float64)
    mids = ((v[:-1] + v[1:]) / 2).astype(F32)
    assert (mids == (v[:-1] + v[1:]) / 2).all()                 # midpoints are exact in fp32
    got = e4m3.encode(mids)
    assert all(c % 2 == 0 and c in (i, i + 1) for i, c in enumerate(got.tolist()))
    assert e4m3.encode(np.array([448, 464, 1e9, -1e9], F32)).tolist() == [0x7E, 0x7E, 0x7E, 0xFE]
    for x in [0.0, 1e-4, 0.3, 7.1, 200.0, 447.0, 500.0]:
        assert e4m3.encode(np.array([x], F32))[0] == scalar_e4m3(F32(x))


def test_e4m3_encode_matches_ml_dtypes_on_random_values():
    import ml_dtypes as ml            # the oracle (a dev requirement): never skipped
    x = (np.random.default_rng(0).standard_normal(100_000) * 60).astype(F32)
    want = np.clip(x, -448, 448).astype(ml.float8_e4m3fn).view(np.uint8)
    assert (e4m3.encode(x) == want).all()


# -- the bitsandbytes package -----------------------------------------------------------------
@pytest.fixture(scope="module")
def bnb():
    import bitsandbytes.functional as F    # the oracle (a dev requirement): never skipped
    return F


def test_bf16_rounds_to_nearest_even_as_ml_dtypes_does():
    """bf16 (calibration's products): round to nearest, ties to even, overflow to inf, NaN kept,
    subnormals rounded like normals; decoding is exact.  Oracle: ml_dtypes.bfloat16."""
    import ml_dtypes as ml
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.standard_normal(20000) * 10.0 ** rng.integers(-40, 38, 20000),
                        [0.0, -0.0, np.inf, -np.inf, 3.3895314e38, -3.39e38, 1e-40, -1e-45]]).astype(F32)
    ties = (np.arange(1, 2001, dtype=np.uint32) << np.uint32(16)) | np.uint32(0x8000)   # exactly halfway
    x = np.concatenate([x, ties.view(F32), (ties | np.uint32(0x80000000)).view(F32)])
    want = x.astype(ml.bfloat16)
    assert np.array_equal(bf16.encode(x), want.view(np.uint16))
    assert np.array_equal(bf16.round_f32(x), want.astype(F32))
    nan = bf16.round_f32(np.array([np.nan, -np.nan], F32))
    assert np.isnan(nan).all()
    codes = np.arange(2 ** 16, dtype=np.uint16)
    finite = ~np.isnan(codes.view(ml.bfloat16).astype(F32))
    assert np.array_equal(bf16.decode(codes)[finite], codes.view(ml.bfloat16).astype(F32)[finite])


def test_dynamic_map_equals_bitsandbytes(bnb):
    assert (bnb.create_dynamic_map().numpy() == dynamic8.MAP).all()


@pytest.mark.parametrize("shape", [(64, 128), (3, 100), (172, 64), (300, 256), (7, 9)])
@pytest.mark.parametrize("double", [False, True])
def test_nf4_equals_bitsandbytes_package(bnb, shape, double):
    import torch
    w = (np.random.default_rng(sum(shape)).standard_normal(shape) * 0.02).astype(F32)
    packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                      compress_statistics=double)
    layout = nf4.Layout(shape, 64, "bnb_dynamic8" if double else "f32", 256)
    parts = layout.split(nf4.quantize(w, layout))
    assert (parts["codes"] == packed.numpy().reshape(-1)).all()
    if not double:
        assert (parts["scales"] == state.absmax.numpy()).all()
        assert (layout.dequantize(layout.join(nf4.unpack(parts["codes"], w.size), parts["scales"]))
                == bnb.dequantize_4bit(packed, state).numpy()).all()
        return
    # The offset is the mean of the absmax: bitsandbytes takes torch's float32 mean, whose last
    # bit depends on torch's summation order (and the CPU's vector width); ours is the exactly
    # rounded mean.  Given bitsandbytes' offset, the nested codes must agree.
    offset = F32(state.offset.item())
    assert abs(parts["offset"][0] - offset) <= np.spacing(offset)
    absmax = dynamic8._blockwise(w.reshape(-1), 64, nf4.nearest_code)[1]
    x = absmax - offset
    q, am2 = dynamic8.quantize_blockwise(x, 256)
    theirs = state.absmax.numpy()
    assert (am2 == state.state2.absmax.numpy()).all()
    scale = np.repeat(am2, 256)[:q.size]
    if (am2 > 0).all():
        # bitsandbytes' CPU kernel finds codes by a binary search that can stop one code short
        # of the nearest; ours (and its CUDA and default backends) take the nearest code
        differ = q != theirs
        assert differ.mean() < 0.01
        assert (np.abs(q.astype(int) - theirs.astype(int)) <= 1).all()
        err = lambda c: np.abs(dynamic8.MAP[c] * scale - x)
        assert (err(q)[differ] < err(theirs)[differ]).all()
    else:
        # a group whose absmax is 0 (one block: absmax - offset == 0): bitsandbytes' CPU kernel
        # stores code 0, the nearest code is that of 0.0; both decode to the same scale
        assert (dynamic8.MAP[q] * scale == dynamic8.MAP[theirs] * scale).all()

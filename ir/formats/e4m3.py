"""OCP FP8 E4M3FN ("fn": finite, no infinities): 1 sign, 4 exponent (bias 7), 3 mantissa bits.

Exponent field 0 holds subnormals m/8 * 2^-6; S.1111.111 is the only NaN, so the largest finite
value is S.1111.110 = 448.  This is not the IEEE-style E4M3 of LLVM/MLIR (max 240).  Encoding
rounds to nearest, ties to the even code, and saturates at ±448 (scales never overflow into NaN).
"""
from __future__ import annotations

import numpy as np

MAX = 448.0
NAN_CODE = 0x7F


def _decode_code(c: int) -> float:
    sign = -1.0 if c & 0x80 else 1.0
    e, m = (c >> 3) & 0xF, c & 0x7
    if e == 0xF and m == 0x7:
        return float("nan")
    if e == 0:
        return sign * (m / 8.0) * 2.0 ** -6
    return sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)


#: code -> value, all 256 codes (float32; every E4M3 value is exact in float32)
DECODE = np.array([_decode_code(c) for c in range(256)], dtype=np.float32)
_POSITIVE = DECODE[:NAN_CODE].astype(np.float64)     # codes 0..126, strictly increasing


def decode(codes: np.ndarray) -> np.ndarray:
    return DECODE[np.asarray(codes, dtype=np.uint8)]


def encode(x: np.ndarray) -> np.ndarray:
    """Round float values to E4M3FN codes: nearest, ties to even, saturating at ±448."""
    x = np.asarray(x, dtype=np.float32)
    if np.isnan(x).any():
        raise ValueError("e4m3.encode: NaN input")
    mag = np.minimum(np.abs(x).astype(np.float64), MAX)
    hi = np.searchsorted(_POSITIVE, mag, side="left")          # _POSITIVE[hi-1] < mag <= _POSITIVE[hi]
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = mag - _POSITIVE[lo], _POSITIVE[hi] - mag       # exact in float64
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(take_hi, hi, lo).astype(np.uint8)
    return code | np.where(np.signbit(x), 0x80, 0).astype(np.uint8)

"""bfloat16: float32's sign and 8 exponent bits with 7 mantissa bits, the top half of a float32.

Encoding rounds to nearest, ties to even, as ml_dtypes and torch do (`vcvtneps2bf16` also
flushes denormals, below 1.2e-38, to zero); NaNs stay NaN (quiet).  Only calibration uses it
(quantize-nf4{products=bf16}); artifacts store no bf16.
"""
from __future__ import annotations

import numpy as np


def encode(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = np.isnan(x)
    return np.where(nan, (u >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def decode(bits: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exactly."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_f32(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (still float32)."""
    return decode(encode(x))

"""bitsandbytes' signed 8-bit "dynamic tree" map and its blockwise quantizer.

bitsandbytes stores the per-block absmax of a double-quantized NF4 weight as codes of this map
(`create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, bitsandbytes
functional.py) with one fp32 absmax per 256 codes.  The map is rebuilt here bit-exactly: per
exponent i = 0..6, 2^i + 1 float32 `linspace(0.1, 1)` boundaries (torch's linspace: a float32
step, each point start + step*k or end - step*(n-1-k) with one rounding), their midpoints,
scaled in float32 by ±10^(i-6); then 0 and 1, zero padding to 256 entries, sorted.  Checked
against the package itself in tests/ir/test_formats.py.
"""
from __future__ import annotations

import numpy as np


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    a, b = np.float32(start), np.float32(end)
    step = np.float32((b - a) / np.float32(n - 1))
    k = np.arange(n, dtype=np.float64)
    # float64 holds a + step*k exactly here, so the cast is the single rounding of an FMA
    return np.where(k < n // 2, np.float64(a) + np.float64(step) * k,
                    np.float64(b) - np.float64(step) * (n - 1 - k)).astype(np.float32)


def _dynamic_map() -> np.ndarray:
    values: list[np.float32] = []
    for i in range(7):
        bounds = _torch_linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (i - 6))
        values += list(scale * means) + list(-scale * means)
    values += [np.float32(0), np.float32(1)]
    values += [np.float32(0)] * (256 - len(values))
    return np.sort(np.array(values, dtype=np.float32))


MAP = _dynamic_map()
#: decision boundaries between neighbouring codes, as bitsandbytes computes them (float32)
MIDPOINTS = ((MAP[:-1] + MAP[1:]) / np.float32(2)).astype(np.float32)


def nearest_code(scaled: np.ndarray) -> np.ndarray:
    """Index of the nearest map entry; a value exactly on a midpoint takes the lower code
    (torch.bucketize(right=False), the rule of bitsandbytes' default backend)."""
    return np.searchsorted(MIDPOINTS, scaled, side="left").astype(np.uint8)


def quantize_blockwise(x: np.ndarray, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(codes u8[n], absmax f32[ceil(n/block)]) of a flat float32 array, bitsandbytes' rules:
    full blocks scale by the reciprocal 1/max(absmax, 1e-38), a tail block divides by
    max(absmax, 1e-38)."""
    return _blockwise(np.asarray(x, dtype=np.float32).reshape(-1), block, nearest_code)


def dequantize_blockwise(codes: np.ndarray, absmax: np.ndarray, block: int = 256) -> np.ndarray:
    scale = np.repeat(np.asarray(absmax, dtype=np.float32), block)[:codes.size]
    return (MAP[codes.reshape(-1)] * scale).astype(np.float32)


def _blockwise(flat: np.ndarray, block: int, to_code) -> tuple[np.ndarray, np.ndarray]:
    """Shared by NF4 and this map: absmax per block, scaled values clamped to [-1, 1], codes."""
    n = flat.size
    full = n - n % block
    body = flat[:full].reshape(-1, block)
    absmax = np.abs(body).max(axis=1) if full else np.zeros(0, np.float32)
    recip = (np.float32(1) / np.maximum(absmax, np.float32(1e-38))).astype(np.float32)
    scaled = np.clip(body * recip[:, None], -1, 1).reshape(-1)
    if n % block:
        # the stored absmax is the true one (bitsandbytes' default backend stores a tail
        # block's clamped to 1e-38; its CPU and CUDA kernels do not; every code decodes alike)
        tail = flat[full:]
        am = np.abs(tail).max().astype(np.float32)
        absmax = np.concatenate([absmax, [am]]).astype(np.float32)
        scaled = np.concatenate([scaled, np.clip(tail / np.maximum(am, np.float32(1e-38)), -1, 1)])
    return to_code(scaled.astype(np.float32)), absmax.astype(np.float32)

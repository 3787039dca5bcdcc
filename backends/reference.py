"""Python twins of the kernels: the exact arithmetic each C++ kernel performs, in numpy.

A twin is not the oracle (the ops' numpy references in ir/ are); it states bit by bit what the
kernel computes, so kernel tests can check C++ against it exactly where the kernel is meant to
be exact (integer dot products, the order of fp32 scaling), and against fp64 with a tolerance
where it approximates (int8 activations, bf16 tiles)."""
from __future__ import annotations

import numpy as np

from amxc.ir.formats import nf4

F32 = np.float32
#: round(127 * NF4 value), the int8 weight table
NF4_I8 = np.round(nf4.TABLE.astype(np.float64) * 127).astype(np.int64)


def quantize_q8(x: np.ndarray, block: int = 64):
    """(q int8 [m, K], qs f32 [m, K/64], qsum int32 [m, K/64]); qs = amax / 127^2 carries the
    1/127 of the int8 weight table too."""
    x = np.ascontiguousarray(x, F32)
    m, k = x.shape
    xb = x.reshape(m, k // block, block)
    amax = np.abs(xb).max(axis=2)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, F32(127) / amax, F32(0)).astype(F32)
    q = np.rint((xb * inv[..., None]).astype(F32)).astype(np.int32)
    return (q.reshape(m, k).astype(np.int8), (amax / F32(16129)).astype(F32), q.sum(axis=2).astype(np.int32))


def block_scale_factors(layout: nf4.Layout, blob: np.ndarray):
    """(weight block scale [N, nb] f32, second-level scale [N, nb] f32 or None) as the kernels
    apply them: first the block scale, then, for fp8_e4m3, the row's fp32 group scale."""
    n, k = layout.shape
    nb = k // 64
    parts = layout.split(blob)
    raw = parts["scales"]
    if layout.pack == "r16k4":
        raw = nf4._from_rows16(raw, n, nb)
    if layout.scale == "f32":
        return raw.reshape(n, nb).astype(F32), None
    dec = nf4.e4m3.decode(raw).reshape(n, nb)
    flat = np.arange(n * nb).reshape(n, nb) // layout.scale_block
    return dec, parts["scales2"][flat]


def gemv_nf4_q8(q, qs, qsum, layout: nf4.Layout, blob, bias=None, resid=None, acc64: bool = False,
                out64: bool = False) -> np.ndarray:
    """The int8 GEMV: y[m, n] = sum over blocks, in order, of fma(dot_int, (w_scale * qs) * s2).
    acc64: the sum in float64 (each term dot * scale exact there), + bias, rounded once to
    float32, then + resid; out64: the float64 sums + bias, unrounded."""
    n, k = layout.shape
    nb = k // 64
    codes = layout.codes(blob).reshape(n, nb, 64)
    w8 = NF4_I8[codes]                                                    # [n, nb, 64]
    m = q.shape[0]
    dots = np.einsum("nbk,mbk->mnb", w8, q.reshape(m, nb, 64).astype(np.int64))  # exact
    dec, s2 = block_scale_factors(layout, blob)
    scale = (dec[None] * qs[:, None, :]).astype(F32)                      # [m, n, nb]
    if s2 is not None:
        scale = (scale * s2[None]).astype(F32)
    return _sum_blocks(dots, scale, bias, resid, acc64, out64)


def gemv_q8_q8(q, qs, qsum, layout, blob, bias=None, resid=None) -> np.ndarray:
    """The int8 GEMV over q8 weights: gemv_nf4_q8's arithmetic with the stored int8 codes in
    place of the NF4 table and f32 block scales (absmax)."""
    n, k = layout.shape
    nb = k // 64
    w8 = layout.codes(blob).reshape(n, nb, 64).astype(np.int64)
    m = q.shape[0]
    dots = np.einsum("nbk,mbk->mnb", w8, q.reshape(m, nb, 64).astype(np.int64))
    scale = (layout.block_scales(blob)[None] * qs[:, None, :]).astype(F32)
    return _sum_blocks(dots, scale, bias, resid)


def _sum_blocks(dots, scale, bias, resid, acc64: bool = False, out64: bool = False) -> np.ndarray:
    """sum over blocks b, in order, of dots[..., b] * scale[..., b] (+ bias) (+ resid) the way
    the GEMVs add: fp32 fmas, or (acc64) float64 fmas rounded once after the bias."""
    m, n, nb = dots.shape
    if acc64:
        acc = np.zeros((m, n), np.float64)
        for b in range(nb):    # fma in float64: the product is exact, one rounding per add
            acc = acc + dots[:, :, b].astype(np.float64) * scale[:, :, b].astype(np.float64)
        if bias is not None:
            acc = acc + bias.astype(np.float64)
        if out64:
            return acc
        y = acc.astype(F32)
        return (y + resid).astype(F32) if resid is not None else y
    acc = np.zeros((m, n), F32)
    for b in range(nb):        # fma: dot * scale exact in float64, one rounding to float32
        acc = (acc.astype(np.float64) + dots[:, :, b].astype(np.float64) * scale[:, :, b]).astype(F32)
    if bias is not None:
        acc = (acc + bias).astype(F32)
    if resid is not None:
        acc = (acc + resid).astype(F32)
    return acc


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    g = g.astype(F32)
    return (g / (F32(1) + np.exp(-g)) * u).astype(F32)

"""GPTQ for NF4 blocks (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", algorithm 1 with lazy batch updates), in numpy.

Columns are quantized one at a time and each column's rounding error is spread over the columns
not yet quantized, weighted by the inverse of H = X^T X of the layer's calibration inputs, so
the layer's output on those inputs moves as little as possible.  NF4 specifics: the 64-wide
block is the unit of scales and of the lazy update; a block's scale is chosen when the block is
reached, from the weights as the errors of earlier blocks left them, among the E4M3 codes at and
up to `search` steps below its absmax (the one with the least H-diagonal-weighted rounding
error); the second-level (fp32, per 256 blocks) scales come from the original weights.  The
result is an ordinary nf4 parameter: the format and the decoder are unchanged.
"""
from __future__ import annotations

import numpy as np

from amxc.ir.formats import e4m3, nf4

TABLE = nf4.TABLE.astype(np.float64)


def _block_scales(w1: np.ndarray, s2: np.ndarray | None, h_diag: np.ndarray, search: int):
    """(stored scale per row — E4M3 codes or f32 — and decoded f64 scale) for one block."""
    absmax = np.abs(w1).max(axis=1).astype(np.float32)
    if s2 is None:                                        # f32 scales
        return absmax, absmax.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        q0 = e4m3.encode(np.where(s2 > 0, absmax / s2, 0).astype(np.float32))
    best_q, best_err = q0, None
    for step in range(search + 1):
        q = np.clip(q0.astype(np.int64) - step, 0, 126).astype(np.uint8)
        d = (e4m3.decode(q) * s2).astype(np.float32).astype(np.float64)
        codes = nf4.nearest_code(np.clip(w1 / np.where(d > 0, d, 1)[:, None], -1, 1).astype(np.float32))
        err = (((w1 - TABLE[codes] * d[:, None]) ** 2) * h_diag).sum(axis=1)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err, best_q = np.where(better, err, best_err), np.where(better, q, best_q)
    return best_q, (e4m3.decode(best_q) * s2).astype(np.float32).astype(np.float64)


def quantize_gptq(weight: np.ndarray, hessian: np.ndarray, layout: nf4.Layout, *, damp: float = 0.01,
                  search: int = 10) -> np.ndarray:
    """The nf4 parameter bytes of `weight` [N, K] (K % 64 == 0) quantized with GPTQ."""
    if layout.block != 64 or layout.scale not in ("fp8_e4m3", "f32"):
        raise ValueError("GPTQ quantizes block 64 with fp8_e4m3 or f32 scales")
    w = np.asarray(weight, np.float64).copy()
    n, k = w.shape
    h = np.asarray(hessian, np.float64).copy()
    dead = np.diag(h) == 0                                # inputs that never fire
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T            # upper, H^-1 = U^T U
    nb = k // 64
    s2_row = None
    s2 = None
    if layout.scale == "fp8_e4m3":
        absmax0 = np.abs(w.reshape(n, nb, 64)).max(axis=2).astype(np.float32).reshape(-1)
        g = layout.scale_block
        padded = np.concatenate([absmax0, np.zeros(-absmax0.size % g, np.float32)])
        s2 = (padded.reshape(-1, g).max(axis=1) / np.float32(e4m3.MAX)).astype(np.float32)
        s2_row = np.repeat(s2, g)[:absmax0.size].reshape(n, nb)
    codes = np.zeros((n, k), np.uint8)
    stored = np.zeros((n, nb), np.uint8 if s2 is not None else np.float32)
    diag = np.diag(h)
    for b in range(nb):
        k0 = b * 64
        w1 = w[:, k0:k0 + 64].copy()
        u1 = u[k0:k0 + 64, k0:k0 + 64]
        stored[:, b], d = _block_scales(w1, None if s2_row is None else s2_row[:, b], diag[k0:k0 + 64], search)
        inv_d = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0.0)
        err = np.zeros((n, 64))
        for i in range(64):
            col = w1[:, i]
            c = nf4.nearest_code(np.clip(col * inv_d, -1, 1).astype(np.float32))
            codes[:, k0 + i] = c
            e = (col - TABLE[c] * d) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err[:, i] = e
        w[:, k0 + 64:] -= err @ u[k0:k0 + 64, k0 + 64:]
    return layout.join(codes.reshape(-1), stored.reshape(-1), s2)

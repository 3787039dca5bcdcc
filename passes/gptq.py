"""GPTQ for NF4 blocks (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", algorithm 1 with lazy batch updates), in numpy.

Columns are quantized one at a time and each column's rounding error is spread over the columns
not yet quantized, weighted by the inverse of H = X^T X of the layer's calibration inputs, so
the layer's output on those inputs moves as little as possible.  NF4 specifics: block scales are
fixed before the sweep ("static groups"), each among the E4M3 codes at and up to `search` steps
below the block's absmax, the one with the least H-diagonal-weighted rounding error; the
second-level (fp32, per 256 blocks) scales come from the same weights.  Fixed scales let the
sweep visit columns in `act_order` (descending H diagonal: the inputs with the most energy
first, while the most columns are left to absorb their error) without changing the format.
The result is an ordinary nf4 parameter: the format and the decoder are unchanged.

`toward_float` is the asymmetric target of GPTAQ (Li et al. 2025, "GPTQv2"): with X the inputs
the quantized model feeds a layer and X_f those the float model feeds it, the W* that best maps
X to the float outputs W X_f is W C^T H^-1 (C = X^T X_f, ridge-damped); quantizing a blend of
W and W* with GPTQ also undoes part of the error that earlier layers left in X.
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


def toward_float(weight: np.ndarray, hessian: np.ndarray, cross: np.ndarray, amount: float,
                 damp: float = 0.01) -> np.ndarray:
    """(1 - amount) W + amount W*, W* = W C^T (H + l I)^-1 with C = X^T X_f and the ridge l
    (damp times the mean of diag H) added to C too, so an ill-posed W* stays near W."""
    if amount == 0:
        return np.asarray(weight, np.float64)
    w = np.asarray(weight, np.float64)
    k = w.shape[1]
    lam = damp * float(np.mean(np.diag(hessian))) or 1.0
    eye = lam * np.eye(k)
    w_star = np.linalg.solve(hessian + eye, (np.asarray(cross, np.float64) + eye) @ w.T).T
    return (1.0 - amount) * w + amount * w_star


def quantize_gptq(weight: np.ndarray, hessian: np.ndarray, layout: nf4.Layout, *, damp: float = 0.01,
                  search: int = 10, act_order: bool = True, lazy: int = 128) -> np.ndarray:
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
    nb = k // 64
    s2 = s2_row = None
    if layout.scale == "fp8_e4m3":
        absmax0 = np.abs(w.reshape(n, nb, 64)).max(axis=2).astype(np.float32).reshape(-1)
        g = layout.scale_block
        padded = np.concatenate([absmax0, np.zeros(-absmax0.size % g, np.float32)])
        s2 = (padded.reshape(-1, g).max(axis=1) / np.float32(e4m3.MAX)).astype(np.float32)
        s2_row = np.repeat(s2, g)[:absmax0.size].reshape(n, nb)
    diag = np.diag(h)
    stored = np.zeros((n, nb), np.uint8 if s2 is not None else np.float32)
    scale = np.zeros((n, nb))
    for b in range(nb):
        stored[:, b], scale[:, b] = _block_scales(w[:, b * 64:(b + 1) * 64],
                                                  None if s2_row is None else s2_row[:, b],
                                                  diag[b * 64:(b + 1) * 64], search)
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    u = np.linalg.cholesky(np.linalg.inv(h)).T            # upper, H^-1 = U^T U
    d = scale[:, perm // 64]                              # each column's (fixed) block scale
    inv_d = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0.0)
    codes = np.zeros((n, k), np.uint8)
    for c0 in range(0, k, lazy):
        c1 = min(c0 + lazy, k)
        w1, err = w[:, c0:c1].copy(), np.zeros((n, c1 - c0))
        for i in range(c1 - c0):
            col, j = w1[:, i], c0 + i
            c = nf4.nearest_code(np.clip(col * inv_d[:, j], -1, 1).astype(np.float32))
            codes[:, j] = c
            e = (col - TABLE[c] * d[:, j]) / u[j, j]
            w1[:, i:] -= np.outer(e, u[j, j:c1])
            err[:, i] = e
        w[:, c1:] -= err @ u[c0:c1, c1:]
    out = np.empty_like(codes)
    out[:, perm] = codes
    return layout.join(out.reshape(-1), stored.reshape(-1), s2)

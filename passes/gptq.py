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

Everything that depends only on the input (H, its damped inverse's Cholesky factor, the column
order, the toward-float map) is an `InputStats`, computed once per input and shared by the
weights that read it (q/k/v, gate/up): the O(K^3) work runs 4 instead of 7 times a layer.
Calibration's statistics are float32 end to end, as in GPTQ's reference: float64 doubled the
time and memory of the K^3 work (TinyLlama's K = 5632 down projection: 13 s and ~1.5 GB of
K x K temporaries a layer) for a factor that agrees to ~5e-7; a damped H whose float32 Cholesky
fails is factored again in float64.

`toward_float` is the asymmetric target of GPTAQ (Li et al. 2025, "GPTQv2"): with X the inputs
the quantized model feeds a layer and X_f those the float model feeds it, the W* that best maps
X to the float outputs W X_f is W C^T H^-1 (C = X^T X_f, ridge-damped); quantizing a blend of
W and W* with GPTQ also undoes part of the error that earlier layers left in X.  Given one
weight's float outputs Y_f = X_f W^T instead (`float_out`: a fused MLP's down projection, whose
outputs the float model makes anyway), W C^T = (X^T Y_f)^T without C: N x K products per token
rather than K x K.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amxc.ir.formats import e4m3, nf4
from amxc.ir.ops.nn import product

TABLE = nf4.TABLE.astype(np.float64)


@dataclass
class InputStats:
    """GPTQ's view of one input (K features): shared by every weight that multiplies it."""
    h: np.ndarray                 # X^T X (undamped; dead inputs as they are), float32 or float64
    dead: np.ndarray              # bool [K]: inputs that are zero on every calibration token
    perm: np.ndarray              # the column order of the sweep
    u: np.ndarray                 # upper Cholesky factor of the damped H^-1, in `perm` order
    # toward_float, with float inputs (else None): B = C + l I.  T with W* = W T is formed on
    # first use by a weight at least 2/3 as tall as K (then shared), a shorter one takes
    # W B^T H^-1 by itself (3 N K^2 against 2 K^3: TinyLlama's down projection, N = 2048 of 5632)
    cross_damped: np.ndarray | None = None
    to_float: np.ndarray | None = None
    # toward_float for the one weight W whose float outputs Y_f = X_f W^T were given instead of
    # X_f (a fused MLP's down projection): X^T Y_f = C W^T [K, N], and the ridge l, so that
    # W B^T = (X^T Y_f)^T + l W without C
    cross_out: np.ndarray | None = None
    ridge: float = 0.0

    @property
    def diag(self) -> np.ndarray:
        return np.diag(self.h)


def input_stats(x, x_float=None, *, float_out=None, damp: float = 0.01, act_order: bool = True) -> InputStats:
    """Statistics of calibration inputs `x` [..., K] (and, for toward_float, of the float
    model's inputs to the same weight, `x_float`, or its outputs of the one weight these
    statistics serve, `float_out`), in float32 (see the module's docstring).  Each may be one
    array or chunks of the tokens (the same chunking for all; the float ones may be an iterator,
    read once in order): H and C (or X^T Y_f) are sums over tokens, taken chunk by chunk."""
    if x_float is not None and float_out is not None:
        raise ValueError("input_stats takes the float model's inputs or its outputs, not both")
    floats = x_float if float_out is None else float_out
    xs = _token_chunks(x)
    pairs = ((c, None) for c in xs) if floats is None else \
        zip(xs, _token_chunks(floats, lazy=True), strict=True)       # other chunkings: ValueError
    h = cross = None
    for c, f in pairs:
        h = gram(c) if h is None else np.add(h, gram(c), out=h)
        if f is not None:
            part = product(c.T, f, np.float32)          # calibration's GEMM (products=bf16: bf16)
            cross = part if cross is None else np.add(cross, part, out=cross)
    if float_out is None:
        return stats_from_hessian(h, cross, damp=damp, act_order=act_order, overwrite_cross=True)
    stats = stats_from_hessian(h, damp=damp, act_order=act_order)
    stats.cross_out = cross.astype(stats.h.dtype, copy=False)
    return stats


def _token_chunks(x, lazy: bool = False):
    """An array [..., K] or a sequence or iterator of them, as float32 [tokens, K] chunks (views
    where possible); `lazy`: as an iterator, each chunk taken when reached."""
    chunks = (np.ascontiguousarray(c, np.float32).reshape(-1, c.shape[-1])
              for c in ([x] if isinstance(x, np.ndarray) else x))
    return chunks if lazy else list(chunks)


def gram(x: np.ndarray) -> np.ndarray:
    """x^T x (x [T, K], C-contiguous): numpy hands `a.T @ a` of one buffer to BLAS syrk, which
    computes one triangle and mirrors it (half a GEMM's work; measured faster than splitting the
    product into blocks on and above the diagonal)."""
    return x.T @ x


def stats_from_hessian(hessian: np.ndarray, cross: np.ndarray | None = None, *, damp: float = 0.01,
                       act_order: bool = True, overwrite_cross: bool = False) -> InputStats:
    """The InputStats of H (and C = X^T X_f), in float32 if H is float32, else float64;
    `overwrite_cross` lets the damped C reuse `cross`'s memory (as scipy's overwrite_a does)."""
    h = np.asarray(hessian)
    h = h if h.dtype == np.float32 else h.astype(np.float64, copy=False)
    k = h.shape[0]
    dead = np.diag(h) == 0
    lam = damp * float(np.mean(np.where(dead, 1.0, np.diag(h).astype(np.float64))))
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    rev = perm[::-1]
    u = _inverse_factor(h, dead, lam, rev)
    if u.dtype != h.dtype:                                   # float32 failed: all in float64
        h = h.astype(np.float64)
    if cross is None:
        return InputStats(h, dead, perm, u, ridge=lam)
    b = np.asarray(cross).astype(h.dtype, copy=not overwrite_cross)   # W*^T = (H + l I)^-1 (C + l I) W^T
    b[np.diag_indices(k)] += b.dtype.type(lam)
    return InputStats(h, dead, perm, u, b, ridge=lam)


def _inverse_factor(h: np.ndarray, dead: np.ndarray, lam: float, rev: np.ndarray) -> np.ndarray:
    """U (upper) with U^T U = (H + l I)^-1 in sweep order (dead inputs' diagonal set to 1 first),
    without forming the inverse: with J the reversal and L = chol(J H J), U = J L^-1 J, since
    (J L^-1 J)^T (J L^-1 J) = J (J H J)^-1 J.  In H's dtype; float64 if float32's Cholesky fails."""
    hd = h[np.ix_(rev, rev)]
    d = np.diag_indices(len(rev))
    hd[d] = np.where(dead[rev], 1.0, hd[d]) + lam
    try:
        inv = inverse_cholesky(hd)
    except np.linalg.LinAlgError:
        if h.dtype == np.float64:
            raise
        return _inverse_factor(h.astype(np.float64), dead, lam, rev)
    del hd
    u = np.ascontiguousarray(inv[::-1, ::-1])
    del inv
    for i in range(0, len(u), 512):                  # triu in place, 512 rows at a time
        u[i:i + 512] = np.triu(u[i:i + 512], i)
    return u


def _inverse_times(stats: InputStats, m: np.ndarray) -> np.ndarray:
    """(H + l I)^-1 m from the factor at hand, U^T U = P (H + l I)^-1 P^T (P: the sweep order):
    2 GEMMs, faster than a solve, and U^T is a transposed view (no K x K copy)."""
    out = np.empty_like(m)
    out[stats.perm] = stats.u.T @ (stats.u @ m[stats.perm])
    return out


def float_target(w: np.ndarray, stats: InputStats) -> np.ndarray:
    """W* = W B^T (H + l I)^-1, the weight that maps the quantized stream's inputs to the float
    model's outputs (in the statistics' dtype)."""
    w = w.astype(stats.h.dtype, copy=False)
    if stats.cross_out is not None:                          # (X^T Y_f + l W^T)^T = W B^T
        if stats.cross_out.shape != w.T.shape:
            raise ValueError(f"these statistics hold float outputs {stats.cross_out.shape[::-1]}, "
                             f"not those of a weight {w.shape}")
        return _inverse_times(stats, stats.cross_out + stats.ridge * w.T).T
    if stats.cross_damped is None:
        raise ValueError("toward_float needs statistics made with the float model's inputs or outputs")
    if stats.to_float is None and 3 * w.shape[0] < 2 * w.shape[1]:
        return _inverse_times(stats, stats.cross_damped @ w.T).T
    if stats.to_float is None:
        stats.to_float = _inverse_times(stats, stats.cross_damped).T
    return w @ stats.to_float


def inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """L^-1 for the Cholesky factor L of h (H = L L^T, lower), by halves: with
    H = [[A, B^T], [B, C]], L11 = chol(A), L21 = B L11^-T, L22 = chol(C - L21 L21^T), and
    L^-1 = [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]].  Matrix products all the way down to 256:
    1.6 s at K = 5632 in float32 on a Zen 3, where numpy's LAPACK Cholesky and a triangular
    inverse by halves took 2.9 s.  Above the diagonal: zero, up to the leaves' rounding (~1e-16).
    Raises LinAlgError where h is not positive definite."""
    k = h.shape[0]
    if k <= 256:
        return np.linalg.inv(np.linalg.cholesky(h))
    m = k // 2
    a_inv = inverse_cholesky(h[:m, :m])
    l21 = h[m:, :m] @ a_inv.T
    c_inv = inverse_cholesky(h[m:, m:] - l21 @ l21.T)
    out = np.zeros_like(h)
    out[:m, :m], out[m:, m:] = a_inv, c_inv
    out[m:, :m] = -(c_inv @ (l21 @ a_inv))
    return out


def toward_float(weight: np.ndarray, stats_or_hessian, cross: np.ndarray | None = None,
                 amount: float = 0.5, damp: float = 0.01) -> np.ndarray:
    """(1 - amount) W + amount W*, W* = W C^T (H + l I)^-1 with C = X^T X_f and the ridge l
    (damp times the mean of diag H) added to C too, so an ill-posed W* stays near W.
    `stats_or_hessian`: an InputStats made with float inputs, or H (then `cross` is C).
    In the statistics' dtype."""
    if amount == 0:
        return np.asarray(weight, np.float64)
    stats = stats_or_hessian if isinstance(stats_or_hessian, InputStats) else \
        stats_from_hessian(stats_or_hessian, cross, damp=damp)
    w = np.asarray(weight, stats.h.dtype)
    out = float_target(w, stats)
    out *= amount
    out += (1.0 - amount) * w
    return out


def absmax_codes(w: np.ndarray, s2_row: np.ndarray) -> np.ndarray:
    """The E4M3 code of each 64-block's absmax over its second-level scale (0 where that is 0):
    where the block-scale search starts (uint8 [n, K/64])."""
    n, k = w.shape
    absmax = np.abs(w.reshape(n, k // 64, 64)).max(axis=2).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return e4m3.encode(np.where(s2_row > 0, absmax / s2_row, 0).astype(np.float32))


def block_scales_numpy(w: np.ndarray, s2_row: np.ndarray | None, h_diag: np.ndarray, search: int):
    """Per block of 64 in w [n, K] (float32 or float64): (stored scale -- E4M3 code or f32 --
    and decoded f64 scale), each [n, K/64]; the E4M3 code is the one of the `search` + 1 at and
    below the absmax code with the least H-diagonal-weighted rounding error (the first on a tie).
    s2_row [n, K/64]: each block's second-level scale, None for f32 scales."""
    n, k = w.shape
    wb = w.reshape(n, k // 64, 64)
    hb = h_diag.reshape(1, k // 64, 64)
    if s2_row is None:                                   # f32 scales
        absmax = np.abs(wb).max(axis=2).astype(np.float32)
        return absmax, absmax.astype(np.float64)
    q0 = absmax_codes(w, s2_row).astype(np.int64)
    best_q, best_err = None, None
    for step in range(search + 1):
        q = np.clip(q0 - step, 0, 126).astype(np.uint8)
        d = (e4m3.decode(q) * s2_row).astype(np.float32).astype(np.float64)
        inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1), 0.0)
        codes = nf4.nearest_code(np.clip(wb * inv[..., None], -1, 1).astype(np.float32))
        err = (((wb - TABLE[codes] * d[..., None]) ** 2) * hb).sum(axis=2)
        if best_err is None:
            best_q, best_err = q, err
        else:
            better = err < best_err
            best_err, best_q = np.where(better, err, best_err), np.where(better, q, best_q)
    return best_q, (e4m3.decode(best_q) * s2_row).astype(np.float32).astype(np.float64)


def quantize_gptq(weight: np.ndarray, stats_or_hessian, layout: nf4.Layout, *, damp: float = 0.01,
                  search: int = 10, act_order: bool = True, lazy: int = 128, sweep=None,
                  block_scales=None) -> np.ndarray:
    """The nf4 parameter bytes of `weight` [N, K] (K % 64 == 0) quantized with GPTQ;
    `stats_or_hessian`: the InputStats of its input, or H = X^T X (damp and act_order then
    apply).  `sweep` and `block_scales`: the column sweep and the scale search to use
    (functions like `sweep_numpy` and `block_scales_numpy`; amxc.api passes native ones,
    backends/calibrate.py), numpy's by default."""
    if layout.block != 64 or layout.scale not in ("fp8_e4m3", "f32"):
        raise ValueError("GPTQ quantizes block 64 with fp8_e4m3 or f32 scales")
    stats = stats_or_hessian if isinstance(stats_or_hessian, InputStats) else \
        stats_from_hessian(stats_or_hessian, damp=damp, act_order=act_order)
    weight = np.asarray(weight)
    # a float32 weight stays float32: exact for the scale search and the sweep, half the copies
    w = np.array(weight, np.float64 if weight.dtype == np.float64 else np.float32)
    n, k = w.shape
    w[:, stats.dead] = 0.0
    nb = k // 64
    s2 = s2_row = None
    if layout.scale == "fp8_e4m3":
        absmax0 = np.abs(w.reshape(n, nb, 64)).max(axis=2).astype(np.float32).reshape(-1)
        g = layout.scale_block
        padded = np.concatenate([absmax0, np.zeros(-absmax0.size % g, np.float32)])
        s2 = (padded.reshape(-1, g).max(axis=1) / np.float32(e4m3.MAX)).astype(np.float32)
        s2_row = np.repeat(s2, g)[:absmax0.size].reshape(n, nb)
    stored, scale = (block_scales or block_scales_numpy)(w, s2_row, np.where(stats.dead, 1.0, stats.diag), search)
    perm, u = stats.perm, stats.u
    column_block = (perm // 64).astype(np.int32)          # each column's (fixed) block scale
    codes = (sweep or sweep_numpy)(np.ascontiguousarray(w[:, perm]), u, np.ascontiguousarray(scale),
                                   column_block, lazy)
    out = np.empty_like(codes)
    out[:, perm] = codes
    return layout.join(out.reshape(-1), stored.reshape(-1), s2)


def sweep_numpy(w: np.ndarray, u: np.ndarray, scale: np.ndarray, column_block: np.ndarray,
                lazy: int = 128) -> np.ndarray:
    """GPTQ's column sweep: NF4 codes [n, k] (uint8, in sweep order) of `w` [n, k] (float64,
    columns already in sweep order), each column j rounded against its fixed block scale
    scale[:, column_block[j]] and its error spread over the columns after it by `u` (the upper
    Cholesky factor of the damped H^-1, sweep order), `lazy` columns at a time.  Rows are
    independent of each other, which is what lets the native sweep run them in parallel."""
    w = np.array(w, np.float64)
    n, k = w.shape
    d = scale.astype(np.float64)[:, column_block]
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
    return codes


def output_error(weight: np.ndarray, decoded: np.ndarray, stats: InputStats, x=None,
                 tokens: int = 1024) -> float:
    """Relative error of the layer's outputs on the calibration inputs: ||(W - Q) X|| / ||W X||,
    from H (tr(D H D^T) / tr(W H W^T): 4 N K^2), or, given the inputs `x` [..., K] and K over
    `tokens`, directly on `tokens` calibration tokens evenly spaced (4 N K tokens: a fifth of the
    work at TinyLlama's K = 5632; a ratio of sums over tokens x N outputs, so the sample is ample
    for a reported figure and for keep_worst's ranking).  `x`: an array or a list of token
    chunks.  In float32: a reported figure."""
    w = np.asarray(weight, np.float32)
    both = np.concatenate([w - np.asarray(decoded, np.float32), w])
    k = w.shape[1]
    if x is not None and k > tokens:
        xs = _evenly_spaced_rows(_token_chunks(x), tokens)
        out = both @ xs.T
        quad = (out * out).sum(axis=1, dtype=np.float64)
    else:
        quad = ((both @ stats.h.astype(np.float32, copy=False)) * both).sum(axis=1, dtype=np.float64)
    num, den = float(quad[:len(w)].sum()), float(quad[len(w):].sum())
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def _evenly_spaced_rows(chunks: list[np.ndarray], count: int) -> np.ndarray:
    """Every (total // count)-th row of the chunks taken as one [tokens, K] array, `count` at most."""
    total = sum(len(c) for c in chunks)
    step, picked, start = max(1, total // count), [], 0
    for c in chunks:
        first = (-start) % step                    # the first multiple of step at or after start
        picked.append(c[first::step])
        start += len(c)
    return np.concatenate(picked)[:count]

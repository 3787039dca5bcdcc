"""The calibration run: @prefill (or @forward) on calibration token ids through the reference
interpreter, for passes that quantize from activation statistics (quantize-nf4's GPTQ,
quantize-int8's SmoothQuant).

The ids are cut into chunks of whole sequences (CHUNK_TOKENS tokens), and every chunk of every
stream runs as its own interpreter state, all in lockstep node by node.  An op then works on a
chunk at a time: its temporaries are a chunk's size, not the whole run's.  A calibration of
SmolLM2 on 16 K tokens had 38 MB activations and 100 MB MLP hidden layers, each a fresh mmap
faulted in page by page (a fifth of its 176 s); in chunks it took 138 s and peaked 0.10 GB
lower, and 122 s with numpy's huge-page advice off (small_pages; Zen 4).  Statistics
over tokens (GPTQ's H = X^T X and C = X^T X_f, SmoothQuant's absmax) are sums or maxima, so an
observer accumulates them over the chunks before it quantizes the weight that every chunk then
reads.

`observe(node, streams)` sees, for each node, `streams[s][c]`: the input arrays of stream s's
chunk c.  It may return replacements in the same shape, a `Computed` of results in the same
shape (stream, then chunk), or None.
"""
from __future__ import annotations

import contextlib

import numpy as np

from amxc.ir.core import Module

#: tokens of a chunk (whole sequences, at least one): small enough that a chunk's widest
#: activation (SmolLM2's 1536-wide hidden layer, 12.6 MB) stays under glibc's 32 MB mmap
#: threshold, so its memory is reused rather than mapped and faulted in again; large enough
#: that each product is a full-speed GEMM
CHUNK_TOKENS = 2048


class CalibrationDone(Exception):
    """Raised by a calibration run's observer once it has seen every weight it wanted."""


def chunks_of(ids: np.ndarray, tokens: int = CHUNK_TOKENS) -> list[np.ndarray]:
    """Token ids [sequences, length] in equal chunks of whole sequences, at most `tokens` each
    (at least one sequence): the interpreter binds symbolic sizes from the first chunk."""
    cap = max(1, tokens // max(1, ids.shape[1]))
    per = max(d for d in range(1, min(cap, ids.shape[0]) + 1) if ids.shape[0] % d == 0)
    return [ids[i:i + per] for i in range(0, ids.shape[0], per)]


def bf16_gemm_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The contract of a calibration `gemm` with bf16 products, in numpy: a @ b of float32 inputs
    rounded to bf16 (round to nearest even), summed in float32 (each product of two bf16 is exact
    in float32, so only the order of the sums may differ; a native GEMM may flush denormal
    inputs to zero, as `vcvtneps2bf16` does).  The oracle of the native one
    (backends/calibrate.native_bf16_gemm, which amxc.api hands the passes), and what
    `products=bf16` runs where none is given."""
    from amxc.ir.formats import bf16
    return np.matmul(bf16.round_f32(a), bf16.round_f32(b))


def run_calibration_streams(module: Module, ids: np.ndarray, count: int, observe,
                            chunk_tokens: int = CHUNK_TOKENS, gemm=None) -> None:
    """@prefill (or @forward) on calibration `ids`, `count` streams in lockstep, each in chunks,
    through the interpreter with float32 accumulation (statistics, not an oracle: float32 BLAS
    is 2-3x faster); the last stream's products through `gemm` when given (nn.accumulate_in:
    the quantized model's, while a float stream before it keeps numpy's float32); `observe` as
    in the module's docstring."""
    from amxc.ir.interpreter import Computed, run_streams
    from amxc.ir.ops.cache import OneLayerKVCache
    from amxc.ir.ops.nn import accumulate_in

    chunks = chunks_of(ids, chunk_tokens)
    per = len(chunks)

    def nested(flat):
        return [flat[s * per:(s + 1) * per] for s in range(count)]

    def flat_observe(node, flat):
        got = observe(node, nested(flat))
        if got is None:
            return None
        out = [c for stream in got for c in stream]
        return Computed(out) if isinstance(got, Computed) else out

    def inputs(c: np.ndarray):
        pos = np.broadcast_to(np.arange(c.shape[1], dtype=np.int64), c.shape).copy()
        if "prefill" in module.functions:
            kv = module.functions["prefill"].args[-1].type
            return [c, pos, OneLayerKVCache(kv, c.shape[0], c.shape[1])]
        return {"input_ids": c, "position_ids": pos}

    def stream_context(s: int):
        return accumulate_in(np.float32, gemm if s >= (count - 1) * per else None)

    function = "prefill" if "prefill" in module.functions else None
    with accumulate_in(np.float32), small_pages():
        run_streams(module, [inputs(c) for _ in range(count) for c in chunks], function=function,
                    observe=flat_observe, stream_context=stream_context if gemm else None)


@contextlib.contextmanager
def small_pages():
    """numpy asks for transparent huge pages (madvise) on every array of 4 MB or more.  Where THP
    defragments on such faults (`defrag` = madvise, a common default) a fault may first compact
    memory, and a calibration run allocates and frees chunk-sized arrays over and over: a
    SmolLM2 gate product's first call ran at 50-90 GFLOP/s against 200 into a warm buffer,
    and 16 K tokens took 134 s against 122 s without the advice (Zen 4 VM, same peak RSS).
    The GEMMs gain nothing measurable from huge pages here."""
    advise = getattr(getattr(np, "_core", getattr(np, "core", None)), "multiarray", None)
    advise = getattr(advise, "_set_madvise_hugepage", None)   # private numpy API: if gone, as before
    if advise is None:
        yield
        return
    was = advise(False)
    try:
        yield
    finally:
        advise(was)


def calibration_run(module: Module, ids: np.ndarray, weight_for, with_float: bool = False,
                    chunk_tokens: int = CHUNK_TOKENS, gemm=None) -> None:
    """Run the model on `ids`; every weight an op reads (its `weights`) goes through
    `weight_for(name, weight, its input, the float model's input or None)`, the inputs as lists
    of chunks, and the node uses its result.  With `with_float` a second stream runs the
    unchanged model in lockstep and supplies the float inputs; for an op's last weight, when
    the op finishes from its activations, it supplies that weight's float outputs instead
    (FloatOutputs: chunks read once, in order).  Weights go in
    input order and each one's input comes from the op's own `weight_input` over the weights
    returned so far, so a fused MLP's down projection sees the hidden layer its just-quantized
    gate and up produce.  Ends early when `weight_for` raises CalibrationDone.  `gemm`: the
    quantized stream's products' GEMM, weight_for's included (run_calibration_streams); the float
    stream's stay in numpy's float32."""
    from amxc.ir.interpreter import Computed
    from amxc.ir.ops.nn import accumulate_in

    def quantized():
        """The quantized stream's products: through `gemm` when given."""
        return accumulate_in(np.float32, gemm)

    def observe(node, streams):
        op = node.opdef
        if not op.weights:
            return None
        chunks, types = [list(a) for a in streams[-1]], [v.type for v in node.inputs]
        floats = streams[0] if with_float else None
        finishes = op.weight_output is not None and op.weights[-1] < len(chunks[0])
        x, float_outs = None, []
        for i in op.weights:
            if i < len(chunks[0]):
                with quantized():
                    x = [op.activation_of(i, a, node.attrs, types) for a in chunks]
                if floats is None:
                    xf = None
                elif finishes and i == op.weights[-1]:
                    xf = FloatOutputs(_float_outputs(op, i, floats, node.attrs, types, float_outs))
                else:
                    xf = [op.activation_of(i, f, node.attrs, types) for f in floats]
                with quantized():
                    w = weight_for(node.inputs[i].name, chunks[0][i], x, xf)
                for a in chunks:
                    a[i] = w
        if not finishes:
            return streams[:-1] + [chunks]
        for _ in xf or ():                       # the float outputs weight_for did not draw out
            pass
        # the activations of the last weight are at hand: finish the op from them (a fused MLP's
        # gate and up products are not computed a second time), each chunk's hidden layer going
        # as its output comes
        outs = []
        for c, args in enumerate(chunks):
            with quantized():
                outs.append(op.weight_output(x[c], *args, **node.attrs, types=types))
            x[c] = None
        return Computed(([float_outs] if floats is not None else []) + [outs])

    try:
        run_calibration_streams(module, ids, 2 if with_float else 1, observe, chunk_tokens, gemm)
    except CalibrationDone:
        pass


class FloatOutputs:
    """The float model's outputs of one weight, Y_f = X_f W^T without a bias, chunk by chunk (an
    iterator, read once, in order), given where its inputs would be: a fused MLP's down
    projection, whose float outputs the float stream needs anyway.  A consumer after C W^T
    (C = X^T X_f) takes X^T Y_f from them, against N outputs rather than K inputs (SmolLM2's
    down projection: 576 against 1536)."""

    def __init__(self, chunks):
        self._chunks = iter(chunks)

    def __iter__(self):
        return self._chunks


def _float_outputs(op, i: int, floats: list, attrs: dict, types: list, outs: list):
    """The float stream's products of the op's last weight, X_f W^T, chunk by chunk; each
    chunk's whole output (bias included) is kept in `outs` as the op's output.  The float
    model's weights are fixed, so its 100 MB hidden layer (SmolLM2, 16 K tokens) is never held
    whole.  A weight_output is that product plus a fixed offset (a bias, as in GPT-2's MLP):
    the output of a zero activation, taken away from what is handed on."""
    from amxc.ir.ops.nn import accumulate_in

    offset = None
    for args in floats:
        with accumulate_in(np.float32):          # the float stream's products, even when drawn
            act = op.activation_of(i, args, attrs, types)      # from a quantized-stream context
            out = op.weight_output(act, *args, **attrs, types=types)
            if offset is None:
                offset = op.weight_output(np.zeros((1, act.shape[-1]), act.dtype), *args, **attrs, types=types)
        outs.append(out)
        del act
        yield out - offset if offset.any() else out

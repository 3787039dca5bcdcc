"""The com.microsoft contrib ops of onnxruntime-genai's model builder, onto amxc's ops:
GroupQueryAttention -> attention (+ rope tables read from the cos/sin caches by position),
RotaryEmbedding -> rope, Skip(Simplified)LayerNormalization -> add + norm, MatMulNBits ->
linear and GatherBlockQuantized -> embedding on the exact dequantized weights.  Registered in
onnx_ops.py's table (imported at its end)."""
from __future__ import annotations

import math

import numpy as np

from amxc.ir import TensorType, Value
from amxc.ir import dtypes as T

from .onnx import MS_DOMAIN, Lazy, clean_name
from .onnx_ops import converts

@converts("SkipSimplifiedLayerNormalization", domain=MS_DOMAIN)
def _skip_rms_norm(conv, ins, at):
    total = _skip_sum(conv, ins)
    out = conv.emit("rms_norm", [total, conv.value(ins[2])], {"eps": float(at.get("epsilon", 1e-5))})
    return [out, None, None, total]


@converts("SkipLayerNormalization", domain=MS_DOMAIN)
def _skip_layer_norm(conv, ins, at):
    total = _skip_sum(conv, [ins[0], ins[1], None, ins[4] if len(ins) > 4 else None])
    inputs = [total, conv.value(ins[2])] + ([conv.value(ins[3])] if len(ins) > 3 and ins[3] is not None else [])
    out = conv.emit("layer_norm", inputs, {"axes": 1, "eps": float(at.get("epsilon", 1e-5))})
    return [out, None, None, total]


def _skip_sum(conv, ins):
    total = conv.emit("add", [conv.value(ins[0]), conv.value(ins[1])], name="residual")
    if len(ins) > 3 and ins[3] is not None:
        total = conv.emit("add", [total, conv.value(ins[3])], name="residual")
    return total


# -- attention and rotary embeddings (com.microsoft) -------------------------------------------------
def _rope_tables(conv, cos_cache, sin_cache, positions: Value, head_dim: int, interleaved: bool):
    """cos/sin [b, 1, s, d] for rope(), read from the [max_positions, d/2] caches by position."""
    if not (isinstance(cos_cache, Lazy) and isinstance(sin_cache, Lazy)):
        conv.fail("rotary cos/sin caches must be initializers")
    rows, half = cos_cache.type.shape
    if sin_cache.type.shape != (rows, half):
        conv.fail(f"rotary caches differ in shape: {cos_cache.type} vs {sin_cache.type}")
    if 2 * half != head_dim:
        conv.fail(f"partial rotary embedding ({2 * half} of {head_dim} dims) is not supported")
    conv.facts["rope_rows"] = min(rows, conv.facts.get("rope_rows", rows))
    conv.facts["rope"] = True
    b, s = positions.type.shape
    out = []
    for cache in (cos_cache, sin_cache):
        t = conv.emit("embedding", [conv.param(cache, name=clean_name(cache.source)), positions], name="rope_table")
        if interleaved:
            t = conv.emit("reshape", [t], {"shape": [b, s, half, 1]})
            t = conv.emit("concat", [t, t], {"axis": 3})
        else:
            t = conv.emit("concat", [t, t], {"axis": 2})
        out.append(conv.emit("reshape", [t], {"shape": [b, 1, s, head_dim]}, name="rope_table"))
    return out


def _heads(conv, x: Value, heads: int, d: int) -> Value:
    """[b, s, heads*d] -> [b, heads, s, d]."""
    b, s = x.type.shape[:2]
    x = conv.emit("reshape", [x], {"shape": [b, s, heads, d]})
    return conv.emit("permute", [x], {"perm": [0, 2, 1, 3]})


@converts("GroupQueryAttention", domain=MS_DOMAIN)
def _gqa(conv, ins, at):
    ins = list(ins) + [None] * (12 - len(ins))
    query, key, value = ins[:3]
    heads, kv_heads = int(at.get("num_heads", 0)), int(at.get("kv_num_heads", 0))
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        conv.fail(f"num_heads={heads}, kv_num_heads={kv_heads} are not valid head counts")
    for name, attr in (("softcap", "softcap"), ("smooth_softmax", "smooth_softmax"), ("qk_output", "qk_output")):
        if float(at.get(attr, 0) or 0):
            conv.fail(f"GroupQueryAttention with {name} is not supported")
    if ins[10] is not None or ins[11] is not None:
        conv.fail("GroupQueryAttention with attention_bias or head_sink is not supported")
    q = conv.value(query)
    if q.type.rank != 3:
        conv.fail(f"GroupQueryAttention query must be [batch, sequence, hidden], got {q.type}")
    b, s, width = q.type.shape
    if key is None:          # packed q|k|v
        if not isinstance(width, int) or width % (heads + 2 * kv_heads):
            conv.fail(f"packed QKV width {width} does not split into {heads}+2x{kv_heads} heads")
        d = width // (heads + 2 * kv_heads)
        q, k, v = conv.emit("split", [q], {"axis": 2, "sizes": [heads * d, kv_heads * d, kv_heads * d]})
    else:
        d = width // heads
        k, v = conv.value(key), conv.value(value)
    q, k, v = _heads(conv, q, heads, d), _heads(conv, k, kv_heads, d), _heads(conv, v, kv_heads, d)
    positions = conv.facts["positions"]
    if int(at.get("do_rotary", 0)):
        interleaved = bool(int(at.get("rotary_interleaved", 0)))
        cos, sin = _rope_tables(conv, ins[7], ins[8], positions, d, interleaved)
        q = conv.emit("rope", [q, cos, sin], {"interleaved": interleaved})
        k = conv.emit("rope", [k, cos, sin], {"interleaved": interleaved})
    scale = float(at.get("scale", 0.0) or 0.0) or 1.0 / math.sqrt(d)
    window = int(at.get("local_window_size", -1))
    out = conv.emit("attention", [q, k, v, positions],
                    {"scale": scale, "causal": True, "window": window if window > 0 else 0})
    out = conv.emit("permute", [out], {"perm": [0, 2, 1, 3]})
    out = conv.emit("reshape", [out], {"shape": [b, s, heads * d]})
    conv.facts.update(num_heads=heads, num_kv_heads=kv_heads, head_dim=d)
    return [out, k, v]


@converts("RotaryEmbedding", domain=MS_DOMAIN)
def _rotary(conv, ins, at):
    if len(ins) < 4 or ins[1] is None:
        conv.fail("com.microsoft RotaryEmbedding needs position_ids")
    x, pos, cos_cache, sin_cache = ins[:4]
    x = conv.value(x)
    if int(at.get("rotary_embedding_dim", 0)) not in (0, 2 * cos_cache.type.shape[1] if isinstance(cos_cache, Lazy) else -1):
        conv.fail("partial rotary embedding is not supported")
    interleaved = bool(int(at.get("interleaved", 0)))
    positions = conv.value(pos)
    if positions.type.dtype != T.i64:
        positions = conv.emit("cast", [positions], {"dtype": T.i64})
    if x.type.rank == 4:          # [b, heads, s, d]
        d = x.type.shape[3]
        cos, sin = _rope_tables(conv, cos_cache, sin_cache, positions, d, interleaved)
        return conv.emit("rope", [x, cos, sin], {"interleaved": interleaved})
    if x.type.rank != 3 or not isinstance(cos_cache, Lazy):
        conv.fail("RotaryEmbedding takes [b, s, hidden] or [b, heads, s, d] and cos/sin initializers")
    b, s, width = x.type.shape
    heads = int(at.get("num_heads", 0))
    d = width // heads if heads > 0 else 2 * cos_cache.type.shape[1]      # as onnxruntime infers it
    if not isinstance(width, int) or d < 2 or width % d:
        conv.fail(f"hidden size {width} does not split into heads of {d}")
    heads = width // d
    cos, sin = _rope_tables(conv, cos_cache, sin_cache, positions, d, interleaved)
    out = conv.emit("rope", [_heads(conv, x, heads, d), cos, sin], {"interleaved": interleaved})
    out = conv.emit("permute", [out], {"perm": [0, 2, 1, 3]})
    return conv.emit("reshape", [out], {"shape": [b, s, width]})


# -- blockwise-quantized weights (com.microsoft) ------------------------------------------------------
def _unpack(conv, raw: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes -> codes, low nibble first for 4 bits (ORT's packing)."""
    if bits == 8:
        return raw.astype(np.float32)
    lo, hi = raw & 0x0F, raw >> 4
    return np.stack([lo, hi], axis=-1).reshape(*raw.shape[:-1], raw.shape[-1] * 2).astype(np.float32)


def _dequantizer(conv, qweight: Lazy, scales: Lazy, zeros, n: int, k: int, bits: int, block: int):
    """A loader of the exact float weight [n, k]: (code - zero point) * scale per block of k."""
    if bits not in (4, 8):
        conv.fail(f"{bits}-bit weights are not supported (4 or 8)")
    if block < 16 or block & (block - 1):
        conv.fail(f"block_size {block} must be a power of two >= 16")
    if not isinstance(qweight, Lazy) or not isinstance(scales, Lazy):
        conv.fail("quantized weights and scales must be initializers")
    blocks = -(-k // block)
    per_row = blocks * block * bits // 8
    if qweight.type.dtype != T.u8 or int(np.prod(qweight.type.shape)) != n * per_row:
        conv.fail(f"quantized weight {qweight.type} does not hold {n}x{k} {bits}-bit codes in blocks of {block}")
    if int(np.prod(scales.type.shape)) != n * blocks:
        conv.fail(f"scales {scales.type} do not give one scale per block of {block} over {n}x{k}")
    if zeros is not None:
        if not isinstance(zeros, Lazy):
            conv.fail("zero points must be an initializer")
        want = n * (-(-blocks * bits // 8)) if zeros.type.dtype == T.u8 else n * blocks
        if int(np.prod(zeros.type.shape)) != want:
            conv.fail(f"zero points {zeros.type} do not fit {n} rows of {blocks} blocks")

    def load():
        codes = _unpack(conv, qweight.loader().reshape(n, per_row), bits)[:, :blocks * block]
        scale = scales.loader().reshape(n, blocks).astype(np.float32)
        if zeros is None:
            zp = np.full((n, blocks), 2 ** (bits - 1), np.float32)
        elif zeros.type.dtype == T.u8:
            zp = _unpack(conv, zeros.loader().reshape(n, -1), bits)[:, :blocks]
        else:
            zp = zeros.loader().reshape(n, blocks).astype(np.float32)
        w = (codes.reshape(n, blocks, block) - zp[:, :, None]) * scale[:, :, None]
        return np.ascontiguousarray(w.reshape(n, blocks * block)[:, :k], dtype=np.float32)
    name = clean_name(qweight.source.removesuffix("_Q4").removesuffix("_Q8"))
    return Lazy(TensorType(T.f32, (n, k)), load, name), (qweight.source, scales.source,
                                                           zeros.source if zeros is not None else None, bits, block)


@converts("MatMulNBits", domain=MS_DOMAIN)
def _matmul_nbits(conv, ins, at):
    ins = list(ins) + [None] * (6 - len(ins))
    a, qweight, scales, zeros, g_idx, bias = ins[:6]
    if g_idx is not None:
        conv.fail("MatMulNBits with g_idx (act-order) is not supported")
    k, n = int(at.get("K", 0)), int(at.get("N", 0))
    if k < 1 or n < 1:
        conv.fail(f"MatMulNBits K={k}, N={n} are not valid sizes")
    lazy, key = _dequantizer(conv, qweight, scales, zeros, n, k, int(at.get("bits", 4)), int(at.get("block_size", 0)))
    x = conv.value(a)
    if x.type.rank < 2 or x.type.shape[-1] != k:
        conv.fail(f"input {x.type} does not have K={k} features")
    inputs = [x, conv.param(lazy, name=lazy.source, key=key)]
    if bias is not None:
        inputs.append(conv.value(bias))
    return conv.emit("linear", inputs)


@converts("GatherBlockQuantized", domain=MS_DOMAIN)
def _gather_block_quantized(conv, ins, at):
    data, idx, scales = ins[:3]
    zeros = ins[3] if len(ins) > 3 else None
    bits, block = int(at.get("bits", 4)), int(at.get("block_size", 128))
    if int(at.get("gather_axis", 0)) != 0 or int(at.get("quantize_axis", 1)) not in (1, -1):
        conv.fail("GatherBlockQuantized is supported for gather_axis=0, quantize_axis=last")
    if not isinstance(data, Lazy) or data.type.rank != 2:
        conv.fail("GatherBlockQuantized data must be a [rows, packed] initializer")
    rows, packed = data.type.shape
    lazy, key = _dequantizer(conv, data, scales, zeros, rows, packed * 8 // bits, bits, block)
    ids = conv.value(idx)
    return conv.emit("embedding", [conv.param(lazy, name=lazy.source, key=key), ids])

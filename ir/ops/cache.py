"""Cache-aware attention: the op the kv-cache pass puts in place of `attention`.

The cache is addressed by token position: `attention_cached` first stores this step's keys and
values at their positions, then attends over every stored position the query may see.  One op
thus serves prefill (many positions) and decode (one), and the runtime is free to store the
cache in pages; `DenseKVCache` is the reference store the interpreter uses."""
from __future__ import annotations

import numpy as np

from ..attrs import Attr
from ..dtypes import i64
from ..registry import register_op
from ..types import KVCacheType
from ._shapes import fail
from .fused import _attention_infer, attend, position_mask


#: the largest finite half-precision value: f16 rows saturate here (an overflow would be inf,
#: and one inf key makes every score of its head NaN)
HALF_MAX = np.float32(65504)


def kv_quantize(x: np.ndarray, storage: str) -> np.ndarray:
    """Rows [..., head_dim] of f32 as the cache stores them ([..., row] float32 words).  f16:
    binary16 rounded to nearest even after saturating to +-HALF_MAX (NaN stays NaN), value e in
    the low half of word e // 2 (little-endian, as the native stores write it).  i8: codes
    rint(x / scale) with scale = absmax / 127 per row (0 for a zero row), the codes' bytes in the
    first head_dim/4 words, the scale in the last; the native kernels round the same way."""
    x = np.asarray(x, np.float32)
    if storage == "f32":
        return x
    d = x.shape[-1]
    if storage == "f16":
        return np.ascontiguousarray(np.clip(x, -HALF_MAX, HALF_MAX).astype(np.float16)).view(np.float32)
    scale = (np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    codes = np.rint(x * inv).astype(np.int8)
    out = np.empty(x.shape[:-1] + (d // 4 + 1,), np.float32)
    out[..., :d // 4] = codes.reshape(*x.shape[:-1], d // 4, 4).view(np.float32)[..., 0]
    out[..., d // 4] = scale[..., 0]
    return out


def kv_dequantize(rows: np.ndarray, storage: str, head_dim: int) -> np.ndarray:
    """The values stored rows hold: the halves as float32 for f16, code * scale for i8."""
    if storage == "f32":
        return rows
    rows = np.ascontiguousarray(rows, np.float32)
    if storage == "f16":
        return rows.view(np.float16)[..., :head_dim].astype(np.float32)
    codes = rows[..., :head_dim // 4].view(np.int8).astype(np.float32)
    return (codes * rows[..., head_dim // 4:]).astype(np.float32)


class DenseKVCache:
    """Per layer, keys and values [batch, kv_heads, capacity, row] (row: head_dim float32, or
    the packed row of storage=f16 or i8), slot = position."""

    def __init__(self, type: KVCacheType, batch: int, capacity: int):
        self.type, self.batch, self.capacity = type, batch, capacity
        shape = (type.physical_layers, batch, type.kv_heads, capacity, type.row)
        self.k = np.zeros(shape, dtype=type.dtype.storage)
        self.v = np.zeros(shape, dtype=type.dtype.storage)
        self.filled = np.zeros((type.layers, batch, capacity), dtype=bool)

    def _slot_array(self, slot: int):
        return (self.k if slot % 2 == 0 else self.v), self.type.layers + slot // 2

    def write_state(self, slot: int, positions, x) -> None:
        """State slot `slot` of every row at `positions` [b, s] := x [b, s, kv_heads*head_dim]."""
        arr, layer = self._slot_array(slot)
        rows = np.arange(self.batch)[:, None]
        arr[layer, rows, :, positions] = x.reshape(*x.shape[:2], self.type.kv_heads, self.type.head_dim)

    def read_state(self, slot: int, positions):
        """State slot `slot` at `positions` [b, n] -> [b, n, width]; zeros where a position < 0."""
        arr, layer = self._slot_array(slot)
        rows = np.arange(self.batch)[:, None]
        got = arr[layer, rows, :, np.maximum(positions, 0)]          # [b, n, kv_heads, head_dim]
        got = got.reshape(*positions.shape, self.type.slot_width)
        return np.where((positions >= 0)[..., None], got, 0).astype(got.dtype)

    def write(self, layer: int, positions, k, v) -> None:
        if positions.min() < 0 or positions.max() >= self.capacity:
            raise IndexError(f"position {int(positions.max())} is outside the KV cache "
                             f"(capacity {self.capacity})")
        rows = np.arange(self.batch)[:, None]
        st = self.type.storage
        self.k[layer, rows, :, positions] = kv_quantize(np.swapaxes(k, 1, 2), st)
        self.v[layer, rows, :, positions] = kv_quantize(np.swapaxes(v, 1, 2), st)
        self.filled[layer, rows, positions] = True

    def read(self, layer: int, upto: int):
        """Keys, values, their positions [b, upto] and which slots hold data."""
        pos = np.broadcast_to(np.arange(upto, dtype=np.int64), (self.batch, upto))
        st, d = self.type.storage, self.type.head_dim
        return (kv_dequantize(self.k[layer, :, :, :upto], st, d), kv_dequantize(self.v[layer, :, :, :upto], st, d),
                pos, self.filled[layer, :, :upto])


class OneLayerKVCache(DenseKVCache):
    """A DenseKVCache that holds one layer's keys and values at a time, for a prefill over fresh
    sequences whose cache is thrown away after (GPTQ calibration): each layer reads its keys
    right after writing them, so the other layers' need no memory.  At 16 K calibration tokens
    that is 1.5 GB of SmolLM2-135M's two streams.  Extra state slots (Yuan's) keep every layer."""

    def __init__(self, type: KVCacheType, batch: int, capacity: int):
        self.type, self.batch, self.capacity = type, batch, capacity
        shape = (1 + type.physical_layers - type.layers, batch, type.kv_heads, capacity, type.row)
        self.k = np.zeros(shape, dtype=type.dtype.storage)
        self.v = np.zeros(shape, dtype=type.dtype.storage)
        self.filled = np.zeros((1, batch, capacity), dtype=bool)
        self.layer: int | None = None

    def _slot_array(self, slot: int):
        return (self.k if slot % 2 == 0 else self.v), 1 + slot // 2

    def write(self, layer: int, positions, k, v) -> None:
        if layer != self.layer:
            self.filled[:] = False
            self.layer = layer
        super().write(0, positions, k, v)

    def read(self, layer: int, upto: int):
        if layer != self.layer:
            raise IndexError(f"this cache holds layer {self.layer}'s keys, not layer {layer}'s")
        return super().read(0, upto)


def _cached_infer(ts, at):
    q, k, v, pos, cache = ts
    if not isinstance(cache, KVCacheType):
        fail("attention_cached needs a kv_cache operand")
    if not 0 <= at["layer"] < cache.layers:
        fail(f"layer {at['layer']} is outside the cache's {cache.layers} layers")
    if k.shape[1] != cache.kv_heads or k.shape[3] != cache.head_dim or k.dtype != cache.dtype:
        fail(f"keys {k} do not fit {cache}")
    if pos.dtype != i64:
        fail("positions must be i64")
    return _attention_infer([q, k, v, pos], at)


@register_op("attention_cached", "q k v positions cache",
             {"layer": Attr("int"), "scale": Attr("float"), "window": Attr("int", 0)},
             infer=_cached_infer, side_effects=True, kind="attention", native="kernel")
def attention_cached(q, k, v, positions, cache, *, layer, scale, window):
    """Store k, v at `positions` in the cache, then causal attention over the cached positions."""
    cache.write(layer, positions, k, v)
    keys, values, kpos, filled = cache.read(layer, int(positions.max()) + 1)
    mask = position_mask(positions, kpos, True, window) & filled[:, None, None, :]
    return attend(q, keys, values, mask, scale)

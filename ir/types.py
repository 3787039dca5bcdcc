"""Tensor types: dtype, shape with symbolic dims, and an optional encoding.

The encoding carries what a quantized storage type needs to be read
(``nf4[2048, 5632]{block=64, scale=fp8_e4m3, scale_block=256}``), so quantization is visible in
the type rather than hidden in op attributes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from . import dims as D
from .dtypes import DType


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: tuple[D.Dim, ...]
    encoding: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))
        if isinstance(self.encoding, Mapping):
            object.__setattr__(self, "encoding", tuple(sorted(self.encoding.items())))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def enc(self) -> dict[str, Any]:
        return dict(self.encoding)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape), self.encoding)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape, self.encoding)

    def concrete_shape(self, env: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(D.evaluate(d, env) for d in self.shape)

    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        """Element count of a static shape."""
        n = 1
        for d in self.shape:
            if not isinstance(d, int):
                raise D.DimError(f"type {self} has a symbolic shape")
            n *= d
        return n

    @property
    def is_quantized(self) -> bool:
        """nf4 or q8: codes and block scales in one flat byte array (ir/formats/)."""
        return self.dtype.name in ("nf4", "q8")

    def nbytes(self) -> int:
        if self.is_quantized:
            return self.quant_layout().nbytes
        return (self.numel() * self.dtype.bits + 7) // 8

    def nf4_layout(self):
        """Where codes and scales lie in an nf4 tensor's bytes (ir/formats/nf4.py)."""
        from .formats.nf4 import Layout
        return Layout.of(self)

    def quant_layout(self):
        """The byte layout of a quantized (nf4 or q8) tensor; ValueError if the encoding is bad."""
        if self.dtype.name == "q8":
            from .formats.q8 import Layout
            return Layout.of(self)
        return self.nf4_layout()

    def storage_shape(self) -> tuple[int, ...]:
        """Shape of the array holding a static tensor of this type: its shape, except for nf4
        and q8, whose codes and scales are one flat byte array."""
        if self.is_quantized:
            return (self.nbytes(),)
        return self.concrete_shape({})

    def __str__(self) -> str:
        text = f"{self.dtype}{D.fmt_shape(self.shape)}"
        if self.encoding:
            text += "{" + ", ".join(f"{k}={_format_field(v)}" for k, v in self.encoding) + "}"
        return text


_KEYWORDS = {"true", "false", "inf", "nan", "none"}


def _format_field(v) -> str:
    """Encoding values that are names (scale=fp8_e4m3) print bare, like dtypes."""
    if isinstance(v, str) and v.isidentifier() and v not in _KEYWORDS:
        return v
    from .attrs import format_value   # local: attrs imports types
    return format_value(v)


def row_words(storage: str, head_dim: int) -> int:
    """float32 words a KV cache row of `head_dim` values takes in `storage` (KVCacheType)."""
    return {"f32": head_dim, "f16": head_dim // 2, "i8": head_dim // 4 + 1}[storage]


def head_dim_of_row(storage: str, row: int) -> int:
    """The head_dim whose rows take `row` words in `storage` (row_words' inverse)."""
    return {"f32": row, "f16": 2 * row, "i8": (row - 1) * 4}[storage]


@dataclass(frozen=True)
class KVCacheType:
    """The key/value cache of all attention layers, as one function argument.  Its contents are
    addressed by token position (see ops/cache.py); the runtime decides the physical layout.

    `state` adds per-position state slots of kv_heads x head_dim values each, for layers whose
    decode needs more than keys and values (Yuan's Localized Filtering keeps its last inputs):
    they live in extra layers of the same paged arrays (slot 2i in K, 2i+1 in V of layer
    `layers + i`), so paging, prefix caching and preemption treat them exactly like K and V.

    `storage` is how the arrays hold a (position, head) row of head_dim values: "f32" as they
    are; "f16": IEEE half precision (saturated to +-65504), two to a float32 word, half the
    memory (llama.cpp's default cache type); or "i8": int8 codes with one float32 scale
    (absmax / 127) per row, packed into head_dim/4 + 1 float32 words (`row`), 3.8x less memory
    at head_dim 64 (ops/cache.py kv_quantize is the rule for both packed forms)."""
    layers: int
    kv_heads: int
    head_dim: int
    dtype: DType
    state: int = 0
    storage: str = "f32"

    STORAGES = ("f32", "f16", "i8")
    #: head_dim must be a multiple of this to pack a row into whole float32 words
    _PACK = {"f16": (2, "a half-precision"), "i8": (4, "an int8")}

    def __post_init__(self):
        if self.storage not in self.STORAGES:
            raise ValueError(f"KV storage {self.storage!r} is not one of {', '.join(self.STORAGES)}")
        if self.storage in self._PACK:
            multiple, what = self._PACK[self.storage]
            if self.head_dim % multiple or self.state:
                raise ValueError(f"{what} KV cache needs head_dim a multiple of {multiple} (got {self.head_dim}) "
                                 f"and no state slots (Localized Filtering inputs must be kept exactly)")

    @property
    def row(self) -> int:
        """float32 words per (position, head) row of the K and V arrays."""
        return row_words(self.storage, self.head_dim)

    @property
    def physical_layers(self) -> int:
        """Layers of the K and V arrays: the attention layers, then the state slots two a layer."""
        return self.layers + (self.state + 1) // 2

    @property
    def slot_width(self) -> int:
        return self.kv_heads * self.head_dim

    def __str__(self) -> str:
        state = f", state={self.state}" if self.state else ""
        storage = f", storage={self.storage}" if self.storage != "f32" else ""
        return (f"kv_cache<layers={self.layers}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}{state}{storage}>")

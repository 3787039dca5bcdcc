"""Element types of the IR.

Every dtype has a short text name (the IR spelling), a bit width, and the numpy dtype the
reference interpreter stores it in.  Quantized codes (nf4, fp8_e4m3) and bf16 have no native
numpy arithmetic; they are stored as raw unsigned integers and only ever decoded by the ops that
own them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    bits: int
    kind: str          # "float", "int", "bool" or "code" (packed/encoded storage)
    storage: np.dtype  # numpy dtype of the interpreter's arrays

    def __str__(self) -> str:
        return self.name

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def itemsize(self) -> float:
        """Bytes per element of the codes (0.5 for nf4; block scales not counted)."""
        return self.bits / 8


f32 = DType("f32", 32, "float", np.dtype(np.float32))
f16 = DType("f16", 16, "float", np.dtype(np.float16))
bf16 = DType("bf16", 16, "code", np.dtype(np.uint16))
f64 = DType("f64", 64, "float", np.dtype(np.float64))
i64 = DType("i64", 64, "int", np.dtype(np.int64))
i32 = DType("i32", 32, "int", np.dtype(np.int32))
i8 = DType("i8", 8, "int", np.dtype(np.int8))
u8 = DType("u8", 8, "int", np.dtype(np.uint8))
bool_ = DType("bool", 8, "bool", np.dtype(np.bool_))
nf4 = DType("nf4", 4, "code", np.dtype(np.uint8))
fp8_e4m3 = DType("fp8_e4m3", 8, "code", np.dtype(np.uint8))
q8 = DType("q8", 8, "code", np.dtype(np.uint8))          # int8 codes + block scales (formats/q8.py)

ALL: dict[str, DType] = {d.name: d for d in (f32, f16, bf16, f64, i64, i32, i8, u8, bool_, nf4, fp8_e4m3, q8)}

_FROM_NUMPY = {np.dtype(np.float32): f32, np.dtype(np.float16): f16, np.dtype(np.float64): f64,
               np.dtype(np.int64): i64, np.dtype(np.int32): i32, np.dtype(np.int8): i8,
               np.dtype(np.uint8): u8, np.dtype(np.bool_): bool_}


def by_name(name: str) -> DType:
    try:
        return ALL[name]
    except KeyError:
        raise KeyError(f"unknown dtype '{name}' (known: {', '.join(ALL)})") from None


def from_numpy(dt) -> DType:
    """The IR dtype of a numpy array's dtype (plain numeric types only)."""
    try:
        return _FROM_NUMPY[np.dtype(dt)]
    except KeyError:
        raise KeyError(f"numpy dtype {np.dtype(dt)} has no IR dtype") from None

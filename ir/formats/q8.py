"""Q8 weights: int8 codes with one f32 scale per block of 64 (llama.cpp's Q8_0 with f32 scales
and blocks of 64), for the matrices 4 bits cost too much: the logits head above all.

A `q8[N, K]{block=64}` parameter is one flat byte array (`Layout`), K a multiple of 64:

    codes    N*K bytes, int8 in [-127, 127], row-major
    scales   N*K/64 f32, the block's absmax

The value of an element is code * absmax / 127 (exact symmetric rounding: code = rint(w * 127 /
absmax)).  The int8 kernels multiply the codes by int8 activations quantized per block of 64 the
same way (backends/templates/q8_ref.cpp.j2), so a block's term is float(integer dot) * (absmax *
activation absmax / 127^2): the NF4 kernels' arithmetic with the codes in place of the NF4
table's round(127 * value).  Error: at most absmax / 254 per element, about 0.3 % relative RMS
on trained weights (NF4: about 9 %).

`pack=r16k4` is the kernels' order: rows in groups of 16 (N padded with zero rows), each group's
64-wide block 1024 bytes: chunk j = 0..7 holds, at byte 4r + t, code + 128 of row r at k = 4j + t,
and 64 bytes further those at k = 4(j + 8) + t -- what the NF4 kernels' table lookup produces,
so the same vpdpbusd loop (u8 weights x s8 activations) reads it directly.  Scales follow the
same grouping, [group][block][16 rows].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PACKS = ("flat", "r16k4")
ROWS = 16
BLOCK = 64


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, ...]
    block: int = BLOCK
    pack: str = "flat"

    def __post_init__(self):
        if self.block != BLOCK:
            raise ValueError(f"q8 block must be {BLOCK}, got {self.block}")
        if self.pack not in PACKS:
            raise ValueError(f"q8 pack '{self.pack}' is not one of {', '.join(PACKS)}")
        if len(self.shape) != 2 or self.shape[1] % BLOCK or self.shape[1] <= 0 or self.shape[0] <= 0:
            raise ValueError(f"q8 needs a [N, K] weight with K a positive multiple of {BLOCK}, "
                             f"got shape {list(self.shape)}")

    @classmethod
    def of(cls, type) -> "Layout":
        enc = type.enc
        unknown = set(enc) - {"block", "pack"}
        if unknown:
            raise ValueError(f"q8 type has unknown encoding field '{sorted(unknown)[0]}'")
        if not type.is_static():
            raise ValueError(f"q8 type {type} needs a static shape")
        for field, kind in (("block", int), ("pack", str)):
            if field in enc and (not isinstance(enc[field], kind) or isinstance(enc[field], bool)):
                raise ValueError(f"q8 encoding field '{field}' must be {'an integer' if kind is int else 'a string'}, "
                                 f"got {enc[field]!r}")
        return cls(tuple(type.shape), enc.get("block", BLOCK), enc.get("pack", "flat"))

    def encoding(self) -> dict:
        return {"block": self.block, **({"pack": self.pack} if self.pack != "flat" else {})}

    def packed(self, pack: str = "r16k4") -> "Layout":
        return Layout(self.shape, self.block, pack)

    @property
    def row_groups(self) -> int:
        return -(-self.shape[0] // ROWS)

    @property
    def rows_stored(self) -> int:
        return self.row_groups * ROWS if self.pack == "r16k4" else self.shape[0]

    def sections(self) -> dict[str, tuple[int, int]]:
        """name -> (byte offset, byte count)."""
        n, k = self.rows_stored, self.shape[1]
        return {"codes": (0, n * k), "scales": (n * k, n * (k // BLOCK) * 4)}

    @property
    def nbytes(self) -> int:
        off, size = self.sections()["scales"]
        return off + size

    def split(self, blob: np.ndarray) -> dict[str, np.ndarray]:
        blob = np.asarray(blob, dtype=np.uint8).reshape(-1)
        if blob.size != self.nbytes:
            raise ValueError(f"q8{list(self.shape)} storage has {blob.size} bytes, layout needs {self.nbytes}")
        (co, cn), (so, sn) = self.sections().values()
        return {"codes": blob[co:co + cn], "scales": blob[so:so + sn].view(np.float32)}

    def join(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """The parameter bytes from int8 codes [N, K] and block scales [N, K/64], row-major."""
        n, k = self.shape
        codes = np.asarray(codes, np.int8).reshape(n, k)
        scales = np.asarray(scales, np.float32).reshape(n, k // BLOCK)
        if self.pack == "r16k4":
            codes, scales = _to_r16k4(codes, scales)
        blob = np.empty(self.nbytes, np.uint8)
        (co, cn), (so, sn) = self.sections().values()
        blob[co:co + cn] = np.ascontiguousarray(codes).view(np.uint8).reshape(-1)
        blob[so:so + sn] = np.ascontiguousarray(scales).view(np.uint8).reshape(-1)
        return blob

    def codes(self, blob: np.ndarray) -> np.ndarray:
        """int8 codes [N, K], row-major."""
        raw = self.split(blob)["codes"]
        if self.pack == "r16k4":
            return _codes_from_r16k4(raw, self.shape)
        return raw.view(np.int8).reshape(self.shape)

    def block_scales(self, blob: np.ndarray) -> np.ndarray:
        """f32 absmax [N, K/64], row-major."""
        raw = self.split(blob)["scales"]
        n, nb = self.shape[0], self.shape[1] // BLOCK
        if self.pack == "r16k4":
            raw = raw.reshape(self.row_groups, nb, ROWS).transpose(0, 2, 1).reshape(-1, nb)[:n]
        return raw.reshape(n, nb).copy()

    def dequantize(self, blob: np.ndarray) -> np.ndarray:
        """The f32 weight: code * absmax / 127, scaled in place with the block scales broadcast
        (one weight-sized array: a repeated scale array and a product took two more, 0.23 GB of
        the compile's peak at SmolLM2's 49152 x 576 head)."""
        n, k = self.shape
        out = self.codes(blob).astype(np.float32)
        scale = (self.block_scales(blob) / np.float32(127)).astype(np.float32)
        out.reshape(n, k // BLOCK, BLOCK)[...] *= scale[:, :, None]
        return out


def _to_r16k4(codes: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, k = codes.shape
    groups, nb = -(-n // ROWS), k // BLOCK
    u = np.full((groups * ROWS, k), 128, np.uint8)                 # padding rows: code 0
    u[:n] = codes.view(np.uint8) ^ np.uint8(0x80)                 # c + 128 mod 256, no int16 copies
    # [g, r, b, half, j, t] -> [g, b, j, half, r, t]: half 0 is k = 4j + t, half 1 k = 4(j + 8) + t
    u = u.reshape(groups, ROWS, nb, 2, 8, 4).transpose(0, 2, 4, 3, 1, 5)
    sc = np.zeros((groups * ROWS, nb), np.float32)
    sc[:n] = scales
    return u.reshape(-1), np.ascontiguousarray(sc.reshape(groups, ROWS, nb).transpose(0, 2, 1)).reshape(-1)


def _codes_from_r16k4(raw: np.ndarray, shape) -> np.ndarray:
    n, k = shape
    groups, nb = -(-n // ROWS), k // BLOCK
    u = raw.reshape(groups, nb, 8, 2, ROWS, 4).transpose(0, 4, 1, 3, 2, 5).reshape(groups * ROWS, k)[:n]
    return (u.astype(np.int16) - 128).astype(np.int8)


#: rows quantize() takes at a time (row-wise arithmetic: any split gives the same bytes)
QUANTIZE_ROWS = 2048


def quantize(weight: np.ndarray, layout: Layout) -> np.ndarray:
    """The q8 parameter bytes of a float weight (flat or packed, as `layout` says)."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.shape != tuple(layout.shape):
        raise ValueError(f"weight {list(w.shape)} does not fit q8{list(layout.shape)}")
    if not np.isfinite(w).all():
        raise ValueError("weight has NaN or infinite values")
    n, k = w.shape
    codes, absmax = np.empty((n, k), np.int8), np.empty((n, k // BLOCK), np.float32)
    for r in range(0, n, QUANTIZE_ROWS):       # rows at a time: a 49152-row head's float temporaries
        blocks = w[r:r + QUANTIZE_ROWS].reshape(-1, k // BLOCK, BLOCK)     # were 0.1 GB each
        amax = np.abs(blocks).max(axis=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        codes[r:r + QUANTIZE_ROWS] = np.clip(np.rint(blocks * inv[..., None]), -127, 127).reshape(len(blocks), k)
        absmax[r:r + QUANTIZE_ROWS] = amax
    return layout.join(codes, absmax)


def repack(blob: np.ndarray, layout: Layout, pack: str = "r16k4") -> tuple[np.ndarray, Layout]:
    """The same weight in another pack; every value is unchanged."""
    target = layout.packed(pack)
    return target.join(layout.codes(blob), layout.block_scales(blob)), target

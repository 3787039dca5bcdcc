"""NF4 weights: the 16-value table, bitsandbytes' quantization rule, and the storage layout of
an `nf4` parameter.

An `nf4[N, K]{block=B, scale=S, scale_block=G}` parameter is one flat byte array (`Layout`):

    codes    ceil(N*K/2) bytes  element 2i in the HIGH nibble of byte i (bitsandbytes order)
    scales   one per block of B consecutive elements of the row-major tensor:
               scale="f32"           f32 absmax
               scale="fp8_e4m3"      E4M3FN code, decoded value times scales2 (our deployment)
               scale="bnb_dynamic8"  bitsandbytes dynamic-map code, times scales2, plus offset
    scales2  f32, one per G consecutive scales (fp8_e4m3, bnb_dynamic8)
    offset   one f32 (bnb_dynamic8: bitsandbytes' `nested_offset`)

Each section starts at a multiple of 4 bytes.  Blocks run over the flattened tensor as in
bitsandbytes, so an imported checkpoint whose rows are not a multiple of B stays exact; the
quantize pass itself only quantizes weights with K % B == 0, where blocks never straddle rows.

`pack=r16k4` is the kernels' order of the same numbers (the `lower` pass repacks to it; the
bitsandbytes order is only an interchange format).  Rows go in groups of 16 (N padded with
zero rows), and each group's 64-wide block is 512 bytes: chunk j = 0..7 holds, at byte 4r + t,
the codes of row r at k = 4j + t (low nibble) and k = 4(j + 8) + t (high nibble).  One 64-byte
chunk, nibbles looked up, is 16 rows x 4 consecutive k: the operand of a VNNI dot product
(vpdpbusd) against 4 broadcast activation bytes, and a row of an AMX int8 B tile.  Block scales
follow the same grouping, [group][block][16 rows] (E4M3 codes, or f32 values: a bitsandbytes
scale decodes exactly to f32); the second-level scales stay flat.  Only block 64 packs.

Quantization follows bitsandbytes (`quantize_4bit`, default backend; research/amx_nf4.md §1.2):
absmax per block, scaled = clamp(w * (1/max(absmax, 1e-38)), -1, 1) in float32 (a tail block
divides instead), code = nearest table entry with exact midpoints going to the LOWER code.
For scale="fp8_e4m3" the scales are quantized first (group max / 448 in fp32, E4M3 round to
nearest even) and the codes chosen against the decoded scale: that costs +0.5 % weight RMS error
over fp32 scales where picking codes from the fp32 absmax costs +4.5 % (amx_nf4.md §1.6).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import dynamic8, e4m3

#: the NF4 values, as float32 bit patterns (bitsandbytes `get_4bit_type("nf4")`)
TABLE = np.array([0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F,
                  0xBDBA7871, 0x00000000, 0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A,
                  0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000], dtype=np.uint32).view(np.float32)
MIDPOINTS = ((TABLE[:-1] + TABLE[1:]) / np.float32(2)).astype(np.float32)

SCALES = ("f32", "fp8_e4m3", "bnb_dynamic8")
BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)


# nearest_code by table: [-1, 1) in 512 cells, each holding at most one midpoint (their gaps
# are over 0.08) and none within 1.6e-4 of a cell edge (far above float32 rounding of the cell
# index), so a cell's count of midpoints below it plus one comparison is searchsorted's answer.
_CELLS = 256
_BELOW = np.searchsorted(MIDPOINTS, np.arange(2 * _CELLS, dtype=np.float64) / _CELLS - 1, side="right") \
    .astype(np.uint8)                                  # midpoints strictly below each cell (edges hold none)
_NEXT = np.append(MIDPOINTS, np.float32(np.inf))


def nearest_code(scaled: np.ndarray) -> np.ndarray:
    """NF4 code of values in [-1, 1] (finite values outside take the end codes); a value
    exactly on a midpoint takes the lower code.  Equal to searchsorted(MIDPOINTS, x, "left"),
    several times faster on the large arrays quantization and GPTQ's scale search pass."""
    x = np.asarray(scaled, np.float32)
    cell = np.minimum(((np.clip(x, -1, 1) + np.float32(1)) * np.float32(_CELLS)).astype(np.int32), 2 * _CELLS - 1)
    below = _BELOW[cell]
    return below + (x > _NEXT[below])


def pack(codes: np.ndarray) -> np.ndarray:
    """Two codes per byte, first in the high nibble; an odd count is padded with code 7 (0.0)."""
    c = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if c.size % 2:
        c = np.concatenate([c, np.array([7], np.uint8)])
    return ((c[0::2] << 4) | c[1::2]).astype(np.uint8)


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(p.size * 2, dtype=np.uint8)
    out[0::2], out[1::2] = p >> 4, p & 0xF
    return out[:n]


def _align4(n: int) -> int:
    return -(-n // 4) * 4


PACKS = ("flat", "r16k4")
ROWS = 16          # rows per r16k4 group


@dataclass(frozen=True)
class Layout:
    """Where each section of an nf4 parameter's bytes lies."""
    shape: tuple[int, ...]
    block: int = 64
    scale: str = "fp8_e4m3"
    scale_block: int = 256
    pack: str = "flat"

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"nf4 block {self.block} is not one of {', '.join(map(str, BLOCKS))}")
        if self.scale not in SCALES:
            raise ValueError(f"nf4 scale '{self.scale}' is not one of {', '.join(SCALES)}")
        if self.scale != "f32" and self.scale_block < 1:
            raise ValueError(f"nf4 scale_block must be positive, got {self.scale_block}")
        if self.pack not in PACKS:
            raise ValueError(f"nf4 pack '{self.pack}' is not one of {', '.join(PACKS)}")
        if self.pack == "r16k4":
            if self.block != 64 or len(self.shape) != 2 or self.shape[1] % 64:
                raise ValueError(f"nf4 pack r16k4 needs block 64 and a [N, K] weight with K % 64 == 0, "
                                 f"got block {self.block}, shape {list(self.shape)}")
            if self.scale == "bnb_dynamic8":
                raise ValueError("nf4 pack r16k4 stores bitsandbytes scales decoded (scale=f32)")

    @classmethod
    def of(cls, type) -> "Layout":
        """The layout of an nf4 TensorType (static shape, encoding with block/scale/scale_block)."""
        enc = type.enc
        unknown = set(enc) - {"block", "scale", "scale_block", "pack"}
        if unknown:
            raise ValueError(f"nf4 type has unknown encoding field '{sorted(unknown)[0]}'")
        if not type.is_static():
            raise ValueError(f"nf4 type {type} needs a static shape")
        for field, kind in (("block", int), ("scale", str), ("scale_block", int), ("pack", str)):
            if field in enc and (not isinstance(enc[field], kind) or isinstance(enc[field], bool)):
                raise ValueError(f"nf4 encoding field '{field}' must be {'an integer' if kind is int else 'a string'}, "
                                 f"got {enc[field]!r}")
        scale = enc.get("scale", "f32")
        default_sb = 0 if scale == "f32" else 256
        if scale == "f32" and "scale_block" in enc:
            raise ValueError("nf4 with scale=\"f32\" has no scale_block")
        return cls(tuple(type.shape), enc.get("block", 64), scale, enc.get("scale_block", default_sb),
                   enc.get("pack", "flat"))

    def encoding(self) -> dict:
        enc = {"block": self.block, "scale": self.scale}
        if self.scale != "f32":
            enc["scale_block"] = self.scale_block
        if self.pack != "flat":
            enc["pack"] = self.pack
        return enc

    def packed(self, pack: str = "r16k4") -> "Layout":
        """This layout in another pack (bitsandbytes scales become their f32 values)."""
        scale = "f32" if self.scale == "bnb_dynamic8" else self.scale
        return Layout(self.shape, self.block, scale, self.scale_block if scale != "f32" else 0, pack)

    @property
    def row_groups(self) -> int:
        return -(-self.shape[0] // ROWS)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.block)

    @property
    def num_groups(self) -> int:
        return -(-self.num_blocks // self.scale_block) if self.scale != "f32" else 0

    def sections(self) -> dict[str, tuple[int, int]]:
        """name -> (byte offset, byte count)."""
        out, at = {}, 0
        slots = self.num_blocks if self.pack == "flat" else self.row_groups * ROWS * (self.shape[1] // 64)
        sizes = {"codes": -(-self.numel // 2) if self.pack == "flat" else slots * 32,
                 "scales": slots * (4 if self.scale == "f32" else 1),
                 "scales2": 4 * self.num_groups,
                 "offset": 4 if self.scale == "bnb_dynamic8" else 0}
        for name, size in sizes.items():
            if size:
                out[name] = (at, size)
                at = _align4(at + size)
        return out

    @property
    def nbytes(self) -> int:
        off, size = list(self.sections().values())[-1]
        return _align4(off + size)

    # -- views of a parameter's bytes ------------------------------------------------------
    def split(self, blob: np.ndarray) -> dict[str, np.ndarray]:
        blob = np.asarray(blob, dtype=np.uint8).reshape(-1)
        if blob.size != self.nbytes:
            raise ValueError(f"nf4{list(self.shape)} storage has {blob.size} bytes, layout needs {self.nbytes}")
        views = {}
        for name, (off, size) in self.sections().items():
            raw = blob[off:off + size]
            as_f32 = name in ("scales2", "offset") or (name == "scales" and self.scale == "f32")
            views[name] = raw.view(np.float32) if as_f32 else raw
        return views

    def join(self, codes: np.ndarray, scales: np.ndarray, scales2=None, offset=None) -> np.ndarray:
        """The parameter bytes from its parts: codes one per element and scales one per block,
        both in row-major (logical) order, whatever the pack."""
        blob = np.zeros(self.nbytes, dtype=np.uint8)
        if self.pack == "r16k4":
            codes, scales = _to_r16k4(np.asarray(codes, np.uint8), np.asarray(scales), self.shape)
        else:
            codes = pack(codes)
        parts = {"codes": codes, "scales": scales, "scales2": scales2,
                 "offset": None if offset is None else np.asarray([offset], np.float32)}
        for name, (off, size) in self.sections().items():
            data = np.ascontiguousarray(parts[name]).view(np.uint8).reshape(-1)
            if data.size != size:
                raise ValueError(f"nf4 {name}: {data.size} bytes given, layout needs {size}")
            blob[off:off + size] = data
        return blob

    # -- numbers -----------------------------------------------------------------------------
    def block_scales(self, blob: np.ndarray) -> np.ndarray:
        """Decoded f32 scale of every block, in row-major block order."""
        v = self.split(blob)
        if self.pack == "r16k4":
            v["scales"] = _from_rows16(v["scales"], self.shape[0], self.shape[1] // 64)
        if self.scale == "f32":
            return v["scales"].copy()
        group = np.repeat(v["scales2"], self.scale_block)[:self.num_blocks]
        if self.scale == "fp8_e4m3":
            return (e4m3.decode(v["scales"]) * group).astype(np.float32)
        return (dynamic8.MAP[v["scales"]] * group + v["offset"][0]).astype(np.float32)

    def codes(self, blob: np.ndarray) -> np.ndarray:
        """One code per element, row-major."""
        raw = self.split(blob)["codes"]
        if self.pack == "r16k4":
            return _from_r16k4(raw, self.shape)
        return unpack(raw, self.numel)

    def dequantize(self, blob: np.ndarray) -> np.ndarray:
        """The f32 weight: table[code] * its block's scale (bitsandbytes' dequantize_4bit)."""
        scales = np.repeat(self.block_scales(blob), self.block)[:self.numel]
        return (TABLE[self.codes(blob)] * scales).astype(np.float32).reshape(self.shape)


def _to_r16k4(codes: np.ndarray, scales: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    n, k = shape
    groups, nb = -(-n // ROWS), k // 64
    c = np.full((groups * ROWS, k), 7, np.uint8)            # padding rows decode to 0.0
    c[:n] = codes.reshape(n, k)
    # [g, r, b, half, j, t] -> [g, b, j, r, t] with half 0 = low nibble, 1 = high
    c = c.reshape(groups, ROWS, nb, 2, 8, 4).transpose(0, 2, 4, 1, 5, 3)
    packed = (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)
    sc = np.zeros((groups * ROWS, nb), scales.dtype)
    sc[:n] = scales.reshape(n, nb)
    return packed.reshape(-1), np.ascontiguousarray(sc.reshape(groups, ROWS, nb).transpose(0, 2, 1)).reshape(-1)


def _from_r16k4(packed: np.ndarray, shape) -> np.ndarray:
    n, k = shape
    groups, nb = -(-n // ROWS), k // 64
    p = packed.reshape(groups, nb, 8, ROWS, 4)
    c = np.stack([p & 0xF, p >> 4], axis=-1)                    # [g, b, j, r, t, half]
    return c.transpose(0, 3, 1, 5, 2, 4).reshape(groups * ROWS, k)[:n].reshape(-1)


def _from_rows16(scales: np.ndarray, n: int, nb: int) -> np.ndarray:
    groups = -(-n // ROWS)
    return scales.reshape(groups, nb, ROWS).transpose(0, 2, 1).reshape(groups * ROWS, nb)[:n].reshape(-1)


def repack(blob: np.ndarray, layout: Layout, pack: str = "r16k4") -> tuple[np.ndarray, Layout]:
    """The same weight in another pack; every decoded value is unchanged."""
    target = layout.packed(pack)
    scales = layout.block_scales(blob) if target.scale == "f32" else \
        (layout.split(blob)["scales"] if layout.pack == "flat"
         else _from_rows16(layout.split(blob)["scales"], layout.shape[0], layout.shape[1] // 64))
    scales2 = layout.split(blob).get("scales2") if target.scale != "f32" else None
    return target.join(layout.codes(blob), scales, scales2), target


def _codes_for(flat: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """Codes of `flat` against given per-block scales (reciprocal multiply, as bitsandbytes)."""
    n = flat.size
    full = n - n % block
    recip = (np.float32(1) / np.maximum(scales, np.float32(1e-38))).astype(np.float32)
    scaled = np.clip(flat[:full].reshape(-1, block) * recip[:full // block, None], -1, 1).reshape(-1)
    if n % block:
        tail = np.clip(flat[full:] / np.maximum(scales[-1], np.float32(1e-38)), -1, 1)
        scaled = np.concatenate([scaled, tail])
    return nearest_code(scaled.astype(np.float32))


def quantize(weight: np.ndarray, layout: Layout, scales2: np.ndarray | None = None) -> np.ndarray:
    """The nf4 parameter bytes of a float weight.  fp8_e4m3: `scales2` (one per group of the
    layout) replaces the groups' own max / 448, so a slice of a weight can be quantized with
    the whole weight's second-level scales and get the whole's codes (passes/quantize_nf4.py)."""
    flat = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1)
    if flat.size != layout.numel:
        raise ValueError(f"weight of {flat.size} elements does not fit nf4{list(layout.shape)}")
    if not np.isfinite(flat).all():
        raise ValueError("weight has NaN or infinite values")
    codes, absmax = dynamic8._blockwise(flat, layout.block, nearest_code)
    if layout.scale == "f32":
        return layout.join(codes, absmax)
    if layout.scale == "bnb_dynamic8":
        # bitsandbytes compress_statistics=True: codes from the fp32 absmax, then the absmax
        # minus its mean quantized blockwise with the dynamic map
        offset = np.float32(absmax.astype(np.float64).mean())
        q, absmax2 = dynamic8.quantize_blockwise(absmax - offset, layout.scale_block)
        return layout.join(codes, q, absmax2, offset)
    # fp8_e4m3: scales first, then codes against the decoded scales
    g = layout.scale_block
    if scales2 is None:
        padded = np.concatenate([absmax, np.zeros(-absmax.size % g, np.float32)])
        scales2 = (padded.reshape(-1, g).max(axis=1) / np.float32(e4m3.MAX)).astype(np.float32)
    scales2 = np.asarray(scales2, np.float32)
    if scales2.shape != (layout.num_groups,):
        raise ValueError(f"scales2 has {scales2.size} values, the layout has {layout.num_groups} groups")
    per_block = np.repeat(scales2, g)[:absmax.size]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(per_block > 0, absmax / per_block, 0).astype(np.float32)
    q = e4m3.encode(ratio)
    decoded = (e4m3.decode(q) * per_block).astype(np.float32)
    return layout.join(_codes_for(flat, decoded, layout.block), q, scales2)


def error_stats(weight: np.ndarray, dequantized: np.ndarray, chunk: int = 1 << 20) -> dict[str, float]:
    """How far the quantized weight is from the original: relative RMS and max abs error.
    Sums in float64 over `chunk` elements at a time: whole-matrix float64 temporaries of a
    32000 x 2048 logits head were 1.5 GB, the peak of a TinyLlama compile."""
    w, q = np.asarray(weight).reshape(-1), np.asarray(dequantized).reshape(-1)
    sq_w = sq_d = max_abs = 0.0
    for i in range(0, w.size, chunk):
        wc = w[i:i + chunk].astype(np.float64)
        dc = q[i:i + chunk].astype(np.float64) - wc
        sq_w += float(np.dot(wc, wc))
        sq_d += float(np.dot(dc, dc))
        max_abs = max(max_abs, float(np.abs(dc).max()))
    norm = float(np.sqrt(sq_w))
    return {"rel_rms": float(np.sqrt(sq_d)) / norm if norm else 0.0, "max_abs": max_abs}

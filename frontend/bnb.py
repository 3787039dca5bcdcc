"""Checkpoints quantized by bitsandbytes (4-bit NF4, with or without double quantization).

transformers saves a `Linear4bit` weight `W` as several safetensors entries: `W` (packed codes,
uint8 [n/2, 1], first element in the high nibble), `W.absmax` (fp32 per block, or uint8 codes
of the dynamic map when double-quantized), `W.quant_map` (the NF4 table), `W.nested_absmax`,
`W.nested_quant_map` (double quantization), and `W.quant_state.bitsandbytes__nf4`, a JSON
record (quant_type, blocksize, shape, nested_blocksize, nested_offset).  These bytes map one to
one onto the sections of an amxc `nf4` parameter (ir/formats/nf4.py), so the import is a copy:
codes and scales are bit-exact, and the decoded weight equals bitsandbytes' dequantize_4bit.
"""
from __future__ import annotations

import json

import numpy as np

from amxc.ir import Module, Param, TensorType
from amxc.ir.dtypes import nf4 as NF4
from amxc.ir.formats import dynamic8, nf4
from amxc.ir.transform import swap_to_nf4

from .errors import FrontendError

STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"


def check_config(raw: dict, where: str) -> bool:
    """True if config.json says the checkpoint is bitsandbytes 4-bit; refuses what we cannot read."""
    q = raw.get("quantization_config")
    if not q:
        return False
    method = q.get("quant_method")
    if method != "bitsandbytes":
        raise FrontendError(f"{where}: quantization '{method}' is not supported (supported: "
                            f"bitsandbytes 4-bit nf4, or an unquantized checkpoint)")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        raise FrontendError(f"{where}: bitsandbytes 8-bit (LLM.int8) checkpoints are not supported; "
                            f"only 4-bit nf4")
    if q.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise FrontendError(f"{where}: bitsandbytes quant type '{q.get('bnb_4bit_quant_type')}' is "
                            f"not supported; only nf4")
    if q.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise FrontendError(f"{where}: bitsandbytes quant storage {q['bnb_4bit_quant_storage']} is not "
                            f"supported; only uint8")
    return True


def quantized_keys(names) -> set[str]:
    return {n[:-len(STATE_SUFFIX)] for n in names if n.endswith(STATE_SUFFIX)}


def nf4_param(source, key: str, name: str) -> Param:
    """The nf4 parameter `name` for checkpoint weight `key` (its data read on demand)."""
    where = f"{key}{STATE_SUFFIX}"
    try:
        state = json.loads(bytes(source.load_raw(where).astype(np.uint8)).decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise FrontendError(f"{where}: not a bitsandbytes quant state ({e})") from None
    if state.get("quant_type") != "nf4":
        raise FrontendError(f"{where}: quant type {state.get('quant_type')!r} is not nf4")
    nested = "nested_blocksize" in state
    try:
        layout = nf4.Layout(tuple(int(d) for d in state["shape"]), int(state["blocksize"]),
                            "bnb_dynamic8" if nested else "f32", int(state.get("nested_blocksize", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise FrontendError(f"{where}: unreadable quant state {state} ({e})") from None
    t = TensorType(NF4, layout.shape, layout.encoding())

    def load() -> np.ndarray:
        codes = source.load_raw(key)
        if codes.dtype != np.uint8 or codes.size != layout.sections()["codes"][1]:
            raise FrontendError(f"{key}: packed codes are {codes.dtype}{list(codes.shape)}, expected "
                                f"{layout.sections()['codes'][1]} uint8 for {list(layout.shape)}")
        table = source.load_raw(f"{key}.quant_map")
        if not np.array_equal(table.astype(np.float32), nf4.TABLE):
            raise FrontendError(f"{key}.quant_map: not the NF4 table")
        scales = source.load_raw(f"{key}.absmax")
        if not nested:
            return layout.join(nf4.unpack(codes, layout.numel), scales.astype(np.float32))
        if not np.array_equal(source.load_raw(f"{key}.nested_quant_map").astype(np.float32), dynamic8.MAP):
            raise FrontendError(f"{key}.nested_quant_map: not bitsandbytes' dynamic 8-bit map")
        return layout.join(nf4.unpack(codes, layout.numel), scales.astype(np.uint8),
                           source.load_raw(f"{key}.nested_absmax").astype(np.float32),
                           np.float32(state["nested_offset"]))
    return Param(name, t, loader=load)


def import_quantized(module: Module, source, find) -> int:
    """Swap every traced weight stored by bitsandbytes for its nf4 parameter; `find(name)` gives
    a parameter's checkpoint key.  Returns how many weights were swapped."""
    keys = quantized_keys(source.names())
    swapped = 0
    for name, p in list(module.params.items()):
        key = find(name)
        if key not in keys:
            continue
        new = nf4_param(source, key, name)
        if tuple(new.type.shape) != tuple(p.type.shape):
            raise FrontendError(f"{key}: quantized shape {list(new.type.shape)} differs from the "
                                f"model's {list(p.type.shape)}")
        try:
            swap_to_nf4(module, p, new)
        except ValueError as e:
            raise FrontendError(f"{key}: {e}") from None
        swapped += 1
    missing = keys - {find(n) for n in module.params}
    if missing:
        raise FrontendError(f"quantized weights the model does not use: {', '.join(sorted(missing)[:3])}")
    return swapped

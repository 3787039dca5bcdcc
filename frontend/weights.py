"""Weight sources: read one tensor at a time, by parameter name, as float32 numpy arrays.

A compile never holds the whole model twice: the traced graph is weightless (meta device) and
each parameter's loader pulls just its own tensor from the checkpoint when asked.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .errors import FrontendError


class WeightSource(Protocol):
    def names(self) -> set[str]: ...
    def load(self, name: str) -> np.ndarray: ...


class SafetensorsSource:
    """A HF checkpoint directory: model.safetensors, or shards listed in model.safetensors.index.json."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open
        self._safe_open = safe_open
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self.files = {name: self.dir / f for name, f in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise FrontendError(f"{index}: not a safetensors index with a weight_map object "
                                    f"({type(e).__name__}: {e})") from None
            if any(not (self.dir / f).resolve().is_relative_to(self.dir.resolve()) for f in self.files.values()):
                raise FrontendError(f"{index}: lists a shard outside {self.dir}")
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise FrontendError(f"{self.dir}: no *.safetensors weights found")
            self.files = {}
            for f in shards:
                with self._open(f, "np") as h:
                    for k in h.keys():
                        self.files[k] = f
        for f in set(self.files.values()):
            if not f.exists():
                raise FrontendError(f"{index}: lists shard {f.name}, which is missing")

    @contextlib.contextmanager
    def _open(self, path: Path, framework: str):
        """safe_open, with a truncated or malformed file reported by name."""
        from safetensors import SafetensorError
        try:
            with self._safe_open(path, framework=framework) as h:
                yield h
        except (SafetensorError, OSError) as e:
            raise FrontendError(f"{path}: not a readable safetensors file ({e})") from None

    def names(self) -> set[str]:
        return set(self.files)

    def load(self, name: str) -> np.ndarray:
        """float32, without torch: numpy has no bfloat16, so BF16 tensors are read as their
        bits and widened (bf16 is float32's top half: exact)."""
        path = self.files[name]
        with self._open(path, "np") as h:
            if h.get_slice(name).get_dtype() != "BF16":
                return np.ascontiguousarray(h.get_tensor(name), np.float32)
        wide = _bf16_bits(path, name).astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32)

    def load_raw(self, name: str) -> np.ndarray:
        """A tensor in its stored dtype (quantized codes, scales)."""
        if name not in self.files:
            raise FrontendError(f"{self.dir}: tensor {name} is missing")
        with self._open(self.files[name], "np") as h:
            return np.ascontiguousarray(h.get_tensor(name))


def _bf16_bits(path: Path, name: str) -> np.ndarray:
    """The bits (uint16, shaped as stored) of BF16 tensor `name` of a safetensors file: an
    8-byte little-endian header size, the JSON header, then the data.  safetensors opened the
    file first, which checks the header; the entry's size is checked against its shape here."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(size))[name]
        start, end = (int(o) for o in entry["data_offsets"])
        shape = tuple(int(d) for d in entry["shape"])
        if entry["dtype"] != "BF16" or end - start != 2 * int(np.prod(shape, dtype=np.int64)):
            raise FrontendError(f"{path}: tensor {name} is not BF16 of shape {list(shape)}")
        f.seek(8 + size + start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise FrontendError(f"{path}: tensor {name} is cut short")
    return np.frombuffer(data, "<u2").reshape(shape)


class GGUFSource:
    def __init__(self, checkpoint):
        self.ckpt = checkpoint

    def names(self) -> set[str]:
        return set(self.ckpt.tensor_names())

    def load(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self.ckpt.load(name), dtype=np.float32)


def resolver(source: WeightSource, aliases: dict[str, list[str]], prefixes: tuple[str, ...] = (),
             extra: dict[str, np.ndarray] | None = None) -> Callable[[str, object], Callable | None]:
    """param_data callback for the importer: finds each parameter in `source` under its own name,
    a tied alias, or with a base-model prefix stripped; `extra` holds computed buffers."""
    names = source.names()
    extra = extra or {}

    def find(target: str) -> str | None:
        for cand in [target, *aliases.get(target, [])]:
            if cand in names:
                return cand
            for p in prefixes:
                if cand.startswith(p) and cand[len(p):] in names:
                    return cand[len(p):]
        return None

    def param_data(target: str, kind) -> Callable[[], np.ndarray] | None:
        if target in extra:
            arr = np.ascontiguousarray(extra[target])
            return lambda: arr
        key = find(target)
        if key is None:
            return None
        return lambda: source.load(key)
    param_data.find = find        # the checkpoint key of a parameter (bitsandbytes import)
    return param_data

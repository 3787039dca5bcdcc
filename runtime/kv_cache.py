"""The paged KV cache's memory: keys and values [layers, num_blocks, kv_heads, block_size, row]
(row: head_dim float32 values; with storage=f16 head_dim halves in head_dim/2 words; with
storage=i8 head_dim int8 codes and a scale packed into head_dim/4 + 1 float32 words; ir/types.py
KVCacheType).

Which block holds what is the block manager's business (blocks.py); how a batch row addresses its
blocks is backends/step.py's (kv_slots; kv_slot in native code).  This is only the storage, sized
once when the engine starts: memory follows the tokens actually held, not batch x max_length.
"""
from __future__ import annotations

import numpy as np

from amxc.ir.types import KVCacheType

from .blocks import KVCacheError

__all__ = ["KVCacheError", "KVStorage"]


class KVStorage:
    def __init__(self, type: KVCacheType, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise KVCacheError("a KV cache needs at least one block of at least one token")
        self.type, self.num_blocks, self.block_size = type, num_blocks, block_size
        shape = (type.physical_layers, num_blocks, type.kv_heads, block_size, type.row)
        nbytes = 2 * int(np.prod(shape)) * type.dtype.storage.itemsize
        what = f"a KV cache of {num_blocks * block_size} tokens needs {nbytes / 2**30:.2f} GiB ({type})"
        available = available_memory()
        if available is not None and nbytes > available:
            raise KVCacheError(f"{what}, more than the {available / 2**30:.2f} GiB this machine has available; "
                               f"ask for fewer KV tokens")
        try:
            self.k = np.zeros(shape, dtype=type.dtype.storage)
            self.v = np.zeros(shape, dtype=type.dtype.storage)
        except MemoryError:
            raise KVCacheError(f"{what}, more than this machine can allocate; ask for fewer KV tokens") from None
        # Touched now, as llama.cpp clears its KV buffer: a request should not pay for the
        # cache's first touch.  numpy backs arrays this big with huge pages; left to the first
        # prefill, faulting them in stalled on memory compaction in 3 of 8 SmolLM2 runs here (a
        # 128-token first prefill of 0.5-1.3 s against 0.07-0.09 s).  Touched at load, 1 run of
        # 11 stalled (load 2.2 s), the others loaded in 0.4-0.5 s as before.
        self.k.fill(0)
        self.v.fill(0)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_per_token(type: KVCacheType) -> int:
        return 2 * type.physical_layers * type.kv_heads * type.row * type.dtype.storage.itemsize


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable), or None
    where /proc/meminfo does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None

"""What one call of a compiled function computes: a StepBatch, and where its keys and values live.

The runtime's scheduler decides each step and describes it here in plain arrays; the native
program (program.py) and the reference interpreter both consume exactly this, so neither needs
to know how the runtime keeps its books (requests, refcounts, the prefix cache).

The paged KV cache is two arrays per step, keys and values, each
`[layers, num_blocks, kv_heads, block_size, head_dim]`.  Position p of batch row r lives in
block `block_tables[r, p // block_size]` at offset `p % block_size`: `kv_slots` below is that map
for Python, `kv_slot` in include/amxc_rt.h the same map for native code, and nothing else
computes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from amxc.ir.ops.cache import kv_dequantize, kv_quantize
from amxc.ir.types import head_dim_of_row

FUNCTIONS = ("prefill", "decode")


class StepError(ValueError):
    """A step batch that does not describe a valid call (shapes, unreserved positions)."""


@dataclass
class StepBatch:
    """One call: `decode` takes b rows of one token each, `prefill` rows of s tokens (the
    runtime sends one row: a prompt chunk)."""
    function: str
    ids: np.ndarray            # int64 [b, s] token ids
    positions: np.ndarray      # int64 [b, s] absolute positions (consecutive within a row)
    block_tables: np.ndarray   # int32 [b, max_blocks] each row's KV blocks, in position order
    seq_ids: np.ndarray        # int64 [b] which sequence each row is (messages, tracing)
    logits: str = "last"       # "last": logits of each row's last token, [b, vocab]; "all": [b, s, vocab]

    def __post_init__(self):
        if self.function not in FUNCTIONS:
            raise StepError(f"unknown step function {self.function!r} (one of {', '.join(FUNCTIONS)})")
        self.ids = np.ascontiguousarray(self.ids, np.int64)
        self.positions = np.ascontiguousarray(self.positions, np.int64)
        self.block_tables = np.ascontiguousarray(self.block_tables, np.int32)
        self.seq_ids = np.asarray(self.seq_ids, np.int64)
        b, s = self.ids.shape
        if self.positions.shape != (b, s) or self.block_tables.ndim != 2 or len(self.block_tables) != b \
                or self.seq_ids.shape != (b,):
            raise StepError(f"step arrays disagree: ids {self.ids.shape}, positions {self.positions.shape}, "
                            f"block tables {self.block_tables.shape}, seq ids {self.seq_ids.shape}")
        if self.function == "decode" and s != 1:
            raise StepError(f"a decode step has one token per row, got {s}")
        if self.logits not in ("last", "all"):
            raise StepError(f"logits must be 'last' or 'all', got {self.logits!r}")

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @property
    def tokens(self) -> int:
        return self.ids.size

    @property
    def context_lens(self) -> np.ndarray:
        """[b] tokens each row's sequence holds in the cache after this step."""
        return self.positions.max(axis=1) + 1 if self.ids.size else np.zeros(0, np.int64)

    def check_reserved(self, block_size: int, num_blocks: int) -> None:
        """Every position must fall in a block of its row's table, and every block must exist."""
        if not self.ids.size:
            return
        lowest = int(self.positions.min())             # each reduction once: this runs every step
        if lowest < 0:
            raise StepError(f"negative position {lowest}")
        need = self.positions.max(axis=1) // block_size
        if int(need.max()) >= self.block_tables.shape[1]:
            r = int(np.argmax(need >= self.block_tables.shape[1]))
            raise StepError(f"position {int(self.positions[r].max())} of sequence {int(self.seq_ids[r])} was not "
                            f"reserved in the KV cache ({self.block_tables.shape[1]} blocks of {block_size})")
        used = self.block_tables
        if used.size:
            lo, hi = int(used.min()), int(used.max())
            if lo < 0 or hi >= num_blocks:
                raise StepError(f"block table names block {hi if hi >= num_blocks else lo} of a cache with {num_blocks}")

    def rows_slice(self, r0: int, r1: int) -> "StepBatch":
        return StepBatch(self.function, self.ids[r0:r1], self.positions[r0:r1], self.block_tables[r0:r1],
                         self.seq_ids[r0:r1], self.logits)

    def tokens_slice(self, c0: int, c1: int) -> "StepBatch":
        return StepBatch(self.function, self.ids[:, c0:c1], self.positions[:, c0:c1], self.block_tables,
                         self.seq_ids, self.logits)


def kv_slots(table: np.ndarray, positions: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, offsets) of `positions` of a row whose block table is `table`."""
    positions = np.asarray(positions)
    return np.asarray(table)[positions // block_size], positions % block_size


class PagedView:
    """A StepBatch's rows over the paged arrays, as the `attention_cached` op's reference
    (ir/ops/cache.py) addresses a cache: write(layer, positions, k, v), read(layer, upto)."""

    def __init__(self, batch: StepBatch, k: np.ndarray, v: np.ndarray, layers: int | None = None,
                 storage: str = "f32"):
        self.batch, self.k, self.v = batch, k, v
        self.block_size = k.shape[3]
        self.layers = k.shape[0] if layers is None else layers      # attention layers; state slots follow
        self.storage = storage                                      # KVCacheType.storage of the arrays
        self.head_dim = head_dim_of_row(storage, k.shape[4])

    def write(self, layer: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        for r in range(len(positions)):
            blocks, offsets = kv_slots(self.batch.block_tables[r], positions[r], self.block_size)
            self.k[layer, blocks, :, offsets] = kv_quantize(k[r].swapaxes(0, 1), self.storage)
            self.v[layer, blocks, :, offsets] = kv_quantize(v[r].swapaxes(0, 1), self.storage)

    def _slot_array(self, slot: int):
        return (self.k if slot % 2 == 0 else self.v), self.layers + slot // 2

    def write_state(self, slot: int, positions: np.ndarray, x: np.ndarray) -> None:
        arr, layer = self._slot_array(slot)
        for r in range(len(positions)):
            blocks, offsets = kv_slots(self.batch.block_tables[r], positions[r], self.block_size)
            arr[layer, blocks, :, offsets] = x[r].reshape(len(positions[r]), arr.shape[2], arr.shape[4])

    def read_state(self, slot: int, positions: np.ndarray) -> np.ndarray:
        arr, layer = self._slot_array(slot)
        out = np.zeros((*positions.shape, arr.shape[2] * arr.shape[4]), arr.dtype)
        for r in range(len(positions)):
            ok = positions[r] >= 0
            if not ok.any():
                continue
            blocks, offsets = kv_slots(self.batch.block_tables[r], positions[r][ok], self.block_size)
            out[r, ok] = arr[layer, blocks, :, offsets].reshape(int(ok.sum()), -1)
        return out

    def read(self, layer: int, upto: int):
        """Keys and values [b, kv_heads, upto, d] gathered through the block tables, their
        positions [b, upto], and which of them the row holds (positions below its context)."""
        keys, values = [], []
        span = np.arange(upto)
        for r in range(self.batch.rows):
            mine = np.minimum(span, self.batch.context_lens[r] - 1)    # past the row's end: any own slot
            blocks, offsets = kv_slots(self.batch.block_tables[r], mine, self.block_size)
            keys.append(self.k[layer, blocks, :, offsets].swapaxes(0, 1))
            values.append(self.v[layer, blocks, :, offsets].swapaxes(0, 1))
        pos = np.broadcast_to(span.astype(np.int64), (self.batch.rows, upto))
        held = span[None, :] < self.batch.context_lens[:, None]
        return (kv_dequantize(np.stack(keys), self.storage, self.head_dim),
                kv_dequantize(np.stack(values), self.storage, self.head_dim), pos, held)

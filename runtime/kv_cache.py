"""The paged KV cache: fixed-size blocks, a block table per sequence, a free list.

Sequences of different lengths share one pool of blocks, so memory follows the tokens actually
held rather than batch x max_length.  `view(seq_ids)` presents a batch of sequences through the
position-addressed protocol the `attention_cached` op uses (`write`/`read`, see
ir/ops/cache.py), so the reference interpreter and later native kernels run on the same cache.
"""
from __future__ import annotations

import numpy as np

from amxc.ir.types import KVCacheType


class KVCacheError(RuntimeError):
    """The cache cannot hold what was asked of it; names the numbers so the fix is obvious."""


class PagedKVCache:
    def __init__(self, type: KVCacheType, num_blocks: int, block_size: int = 16):
        if num_blocks < 1 or block_size < 1:
            raise KVCacheError("a KV cache needs at least one block of at least one token")
        self.type, self.num_blocks, self.block_size = type, num_blocks, block_size
        shape = (type.layers, num_blocks, type.kv_heads, block_size, type.head_dim)
        self.k = np.zeros(shape, dtype=type.dtype.storage)
        self.v = np.zeros(shape, dtype=type.dtype.storage)
        self.filled = np.zeros((num_blocks, block_size), dtype=bool)   # which slots hold a token
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))   # pop() gives block 0 first
        self.tables: dict[int, list[int]] = {}

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def reserve(self, seq: int, tokens: int) -> None:
        """Make room for positions 0..tokens-1 of `seq`, allocating blocks as needed."""
        table = self.tables.setdefault(seq, [])
        missing = self.blocks_needed(tokens) - len(table)
        if missing > len(self.free_blocks):
            raise KVCacheError(
                f"KV cache full: sequence {seq} needs {tokens} tokens ({missing} more blocks of "
                f"{self.block_size}), {len(self.free_blocks)} of {self.num_blocks} blocks are free "
                f"({self.capacity_tokens} tokens in all); allow more KV tokens or fewer/shorter sequences")
        for _ in range(max(missing, 0)):
            table.append(self.free_blocks.pop())

    def free(self, seq: int) -> None:
        blocks = self.tables.pop(seq, [])
        self.filled[blocks] = False
        self.free_blocks.extend(reversed(blocks))

    def tokens(self, seq: int) -> int:
        """How many positions of `seq` hold keys and values."""
        return int(self.filled[self.tables.get(seq, [])].sum())

    def view(self, seqs: list[int]) -> "BatchView":
        return BatchView(self, list(seqs))


class BatchView:
    """A batch of sequences as the `attention_cached` op sees it: row r is sequence seqs[r]."""

    def __init__(self, cache: PagedKVCache, seqs: list[int]):
        self.cache, self.seqs = cache, seqs
        self.type = cache.type

    def _table(self, seq: int, positions: np.ndarray) -> list[int]:
        """`seq`'s block table, after checking that every position in `positions` is reserved."""
        table = self.cache.tables[seq]
        if positions.size and positions.max() >= len(table) * self.cache.block_size:
            raise KVCacheError(f"position {int(positions.max())} of sequence {seq} was not "
                               f"reserved in the KV cache")
        return table

    def _slots(self, row: int, positions: np.ndarray):
        table = self._table(self.seqs[row], positions)
        return np.asarray(table)[positions // self.cache.block_size], positions % self.cache.block_size

    def block_tables(self, seqs: list[int], positions: np.ndarray) -> np.ndarray:
        """[len(seqs), widest] int32 block tables for a native step whose row r is seqs[r] at
        positions[r] (checked reserved); short tables are padded with block 0."""
        tables = [self._table(q, positions[r]) for r, q in enumerate(seqs)]
        out = np.zeros((len(seqs), max(max(map(len, tables)), 1)), np.int32)
        for r, t in enumerate(tables):
            out[r, :len(t)] = t
        return out

    def write(self, layer: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        c = self.cache
        for row in range(len(self.seqs)):
            blocks, offsets = self._slots(row, positions[row])
            c.k[layer, blocks, :, offsets] = k[row].swapaxes(0, 1)
            c.v[layer, blocks, :, offsets] = v[row].swapaxes(0, 1)
            c.filled[blocks, offsets] = True

    def read(self, layer: int, upto: int):
        """Keys and values [b, kv_heads, upto, d] gathered through the block tables, their
        positions [b, upto], and which of them hold data for each row."""
        c = self.cache
        n_blocks = c.blocks_needed(upto)
        keys, values, filled = [], [], []
        for row, seq in enumerate(self.seqs):
            table = c.tables[seq][:n_blocks]
            blocks = np.asarray(table + [table[-1]] * (n_blocks - len(table)))
            k = c.k[layer, blocks].transpose(1, 0, 2, 3).reshape(c.type.kv_heads, -1, c.type.head_dim)
            v = c.v[layer, blocks].transpose(1, 0, 2, 3).reshape(c.type.kv_heads, -1, c.type.head_dim)
            keys.append(k[:, :upto])
            values.append(v[:, :upto])
            # padding blocks repeat a real one; only the row's own slots count as filled
            own = np.zeros(n_blocks * c.block_size, dtype=bool)
            own[:len(table) * c.block_size] = c.filled[table].reshape(-1)
            filled.append(own[:upto])
        pos = np.broadcast_to(np.arange(upto, dtype=np.int64), (len(self.seqs), upto))
        return np.stack(keys), np.stack(values), pos, np.stack(filled)

"""The KV block manager: fixed-size blocks with refcounts, a free list, and a prefix cache.

A sequence holds a table of blocks (positions 0..block_size-1 in its first block, and so on).
Blocks are shared by reference: a full block whose tokens (and every token before them) are the
same in two sequences holds the same keys and values, so it is computed once.

Prefix cache: each full block gets a key chained through the previous block's key,
key_i = H(key_{i-1}, tokens of block i) (vLLM's scheme).  Looking a prompt up walks its full
blocks from the start and stops at the first miss.  We chose the hash chain over SGLang's radix
tree because our unit of sharing is the block anyway (the kernels address KV by block), and a
flat dict of keys needs no tree maintenance: insert, lookup and evict are each O(1) per block.
A radix tree's extra — sharing at token rather than block granularity — matters little at a
block size of 16.

Only full blocks are ever cached or shared; the partially filled last block of a sequence is its
own.  A block whose last reference goes away keeps its key and contents and becomes evictable:
it is reused by a later lookup, or handed out again, least recently freed first (LRU).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


class KVCacheError(RuntimeError):
    """The cache cannot hold what was asked of it; names the numbers so the fix is obvious."""


def block_key(previous: bytes, tokens) -> bytes:
    """The prefix-cache key of a full block of `tokens` following a block keyed `previous`."""
    return hashlib.blake2b(previous + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


@dataclass
class BlockStats:
    """Counters since the manager was made."""
    lookup_tokens: int = 0        # prompt tokens looked up in the prefix cache
    hit_tokens: int = 0           # of which found cached (not computed again)
    evictions: int = 0            # cached blocks reused for other contents

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise KVCacheError("a KV cache needs at least one block of at least one token")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.refs = np.zeros(num_blocks, np.int32)
        self._plain: list[int] = list(range(num_blocks - 1, -1, -1))    # free, no cached contents; pop() -> 0 first
        self._evictable: OrderedDict[int, None] = OrderedDict()         # free, cached; oldest first
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.stats = BlockStats()

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached-but-unreferenced ones included)."""
        return len(self._plain) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    # -- prefix cache --------------------------------------------------------------------------
    def lookup(self, tokens, limit: int | None = None) -> tuple[list[int], list[bytes]]:
        """The cached blocks holding the longest prefix of `tokens` made of full blocks (at most
        `limit` blocks), with their keys.  Takes no reference: acquire() them."""
        blocks, keys, prev = [], [], b""
        if not self.prefix_caching:
            return blocks, keys
        n = len(tokens) // self.block_size if limit is None else min(limit, len(tokens) // self.block_size)
        for i in range(n):
            key = block_key(prev, tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
            prev = key
        return blocks, keys

    def register(self, block: int, key: bytes) -> None:
        """`block` is full and holds the contents `key` names: later lookups may share it.  If
        another block already holds them (computed at the same time), that one stays the cached
        copy and this block remains private."""
        if not self.prefix_caching or block in self._key_of or key in self._block_of:
            return
        self._key_of[block] = key
        self._block_of[key] = block

    # -- references ----------------------------------------------------------------------------
    def can_allocate(self, n: int, reusing: list[int] = ()) -> bool:
        """Whether n new blocks fit after taking references to `reusing` (cached blocks that
        may be sitting in the free pool)."""
        idle = sum(1 for b in reusing if self.refs[b] == 0)
        return n + idle <= self.num_free

    def acquire(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refs[b] == 0:
                self._evictable.pop(b, None)
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise KVCacheError(f"KV cache full: {n} blocks of {self.block_size} tokens wanted, {self.num_free} of "
                               f"{self.num_blocks} free ({self.capacity_tokens} tokens in all)")
        out = []
        for _ in range(n):
            if self._plain:
                b = self._plain.pop()
            else:                                   # evict the least recently freed cached block
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
                self.stats.evictions += 1
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each of `blocks` (a sequence's table: freed last block first,
        so a prefix's head stays cached longest)."""
        for b in reversed(blocks):
            if self.refs[b] <= 0:
                raise KVCacheError(f"block {b} released more often than it was taken")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    self._plain.append(b)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence holds."""
        for b in list(self._evictable):
            del self._block_of[self._key_of.pop(b)]
            self._plain.append(b)
        self._evictable.clear()

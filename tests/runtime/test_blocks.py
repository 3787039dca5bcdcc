"""The block manager: refcounts, the free list, the prefix cache's chained keys, LRU eviction."""
from __future__ import annotations

import pytest

from amxc.runtime.blocks import BlockManager, KVCacheError, block_key


def filled(m: BlockManager, tokens: list[int]) -> list[int]:
    """Blocks for `tokens`, each full one registered as a sequence would after computing it."""
    blocks = m.allocate(m.blocks_for(len(tokens)))
    prev = b""
    for i in range(len(tokens) // m.block_size):
        prev = block_key(prev, tokens[i * m.block_size:(i + 1) * m.block_size])
        m.register(blocks[i], prev)
    return blocks


def test_allocate_release_and_refcounts():
    m = BlockManager(4, 2)
    a = m.allocate(3)
    assert m.num_free == 1 and m.num_used == 3
    with pytest.raises(KVCacheError, match=r"2 blocks of 2 tokens wanted, 1 of 4 free \(8 tokens in all\)"):
        m.allocate(2)
    m.acquire(a[:1])                          # shared by a second sequence
    m.release(a)
    assert m.num_free == 3 and m.refs[a[0]] == 1
    m.release(a[:1])
    assert m.num_free == 4
    with pytest.raises(KVCacheError, match="released more often than it was taken"):
        m.release(a[:1])


def test_lookup_finds_the_longest_cached_prefix_of_whole_blocks():
    m = BlockManager(8, 2)
    blocks = filled(m, [1, 2, 3, 4, 5])       # blocks [1,2] [3,4] cached, [5] partial
    hits, keys = m.lookup([1, 2, 3, 4, 9, 9])
    assert hits == blocks[:2] and len(keys) == 2
    assert m.lookup([1, 2, 3, 9])[0] == blocks[:1]
    assert m.lookup([9, 2, 3, 4])[0] == []    # chained: block 2 only matches after block 1
    assert m.lookup([1, 2, 3, 4, 5, 6], limit=1)[0] == blocks[:1]


def test_freed_cached_blocks_are_reused_then_evicted_least_recently_freed_first():
    m = BlockManager(4, 2)
    a = filled(m, [1, 2, 3, 4])
    m.release(a)                              # both cached, evictable
    assert m.num_free == 4 and m.num_cached == 2
    hits, _ = m.lookup([1, 2, 3, 4, 7])
    assert m.can_allocate(2, hits) and not m.can_allocate(3, hits)
    m.acquire(hits)
    assert m.num_free == 2
    m.release(hits)
    m.allocate(2)                             # the two never-cached blocks first
    assert m.num_cached == 2 and m.stats.evictions == 0
    m.allocate(1)                             # then the least recently freed: the tail block [3, 4]
    assert m.stats.evictions == 1 and m.lookup([1, 2, 3, 4])[0] == a[:1]


def test_a_duplicate_block_stays_private():
    m = BlockManager(4, 2)
    a = filled(m, [1, 2])
    b = filled(m, [1, 2])                     # computed at the same time by another sequence
    assert m.lookup([1, 2, 3])[0] == a[:1]
    m.release(b)
    assert m.num_cached == 1                  # b's block went back as a plain free block


def test_prefix_caching_off_and_reset():
    off = BlockManager(4, 2, prefix_caching=False)
    off.release(filled(off, [1, 2, 3, 4]))
    assert off.num_cached == 0 and off.lookup([1, 2, 3])[0] == []
    on = BlockManager(4, 2)
    on.release(filled(on, [1, 2, 3, 4]))
    on.reset_prefix_cache()
    assert on.num_cached == 0 and on.num_free == 4 and on.lookup([1, 2, 3])[0] == []

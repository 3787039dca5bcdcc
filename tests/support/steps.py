"""Driving a program step by step, below the scheduler: one sequence's prefill and decode calls
with every position's logits, for tests that compare logits step against step."""
from __future__ import annotations

import numpy as np

from amxc.backends.step import StepBatch
from amxc.runtime.blocks import BlockManager
from amxc.runtime.kv_cache import KVStorage


class Stepper:
    """Sequences by id over a private paged cache of `kv_tokens` tokens."""

    def __init__(self, program, kv_tokens: int = 2048, block_size: int = 16):
        cache = program.module.functions["prefill"].args[-1].type
        nb = -(-kv_tokens // block_size)
        self.program, self.storage = program, KVStorage(cache, nb, block_size)
        self.blocks = BlockManager(nb, block_size, prefix_caching=False)
        self.tables: dict[int, list[int]] = {}

    def reserve(self, seq: int, tokens: int) -> None:
        table = self.tables.setdefault(seq, [])
        table += self.blocks.allocate(self.blocks.blocks_for(tokens) - len(table))

    def free(self, seq: int) -> None:
        self.blocks.release(self.tables.pop(seq, []))

    def step(self, function: str, seqs: list[int], ids, pos) -> np.ndarray:
        """Logits [b, s, vocab] of every position."""
        tables = [self.tables[q] for q in seqs]
        bt = np.zeros((len(seqs), max(map(len, tables))), np.int32)
        for r, t in enumerate(tables):
            bt[r, :len(t)] = t
        batch = StepBatch(function, np.asarray(ids, np.int64), np.asarray(pos, np.int64), bt, seqs, logits="all")
        return self.program.run(batch, self.storage.k, self.storage.v)

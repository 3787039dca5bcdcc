"""Perplexity of a compiled model on a text, with a sliding window.

The text is tokenized as one stream (with the tokenizer's BOS at its start, if it adds one)
and read in windows of `window` tokens that start `stride` tokens apart, as in Hugging Face's
perplexity guide: every window is one prefill from an empty KV cache, and scores only the
tokens the previous window did not (the first window scores all but its first token).  A stride
below the window gives every scored token at least `window - stride` tokens of context; stride
= window gives non-overlapping windows.  NLL is computed from the logits in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Callable

import numpy as np


@dataclass
class Perplexity:
    tokens_scored: int
    windows: int
    window: int
    stride: int
    mean_nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    def to_json(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity}


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per row, in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=-1))
    return logz - z[np.arange(len(targets)), targets]


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window (got window {window}, stride {stride})")
    out, scored_to = [], 1                   # position 0 has no prediction
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + window, n)
        if end <= scored_to:
            break
        out.append((begin, end, scored_to))
        scored_to = end
        if end == n:
            break
    return out


def perplexity(logits_of: Callable[[list[int]], np.ndarray], ids: list[int], window: int, stride: int,
               progress: bool = False) -> Perplexity:
    """`logits_of(ids)` gives [len(ids), vocab] logits of one prefill."""
    from tqdm import tqdm

    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    spans = windows(len(ids), window, stride)
    total, count = 0.0, 0
    for begin, end, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress, leave=False):
        chunk = ids[begin:end]
        logits = logits_of(chunk)
        # logits at position p predict token p+1; score targets first..end-1
        rows = np.arange(first - begin - 1, end - begin - 1)
        nll = log_softmax_nll(logits[rows], np.asarray(chunk)[rows + 1])
        total += float(nll.sum())
        count += len(rows)
    return Perplexity(count, len(spans), window, stride, total / count)

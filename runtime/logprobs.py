"""Log-probabilities of tokens, for clients that score text (OpenAI's `logprobs`, `echo`;
lm-evaluation-harness's log-likelihood tasks).

They are the model's own distribution: log-softmax of the raw logits, before temperature,
top-k/top-p or penalties (vLLM's default "raw_logprobs"), computed in float64 so that a score
summed over thousands of tokens does not drift with the kernels' float32 rounding."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP_LOGPROBS = 20        # what OpenAI's chat API and vLLM allow


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability, and the `top` most likely tokens
    (id, logprob), most likely first (ties: lower id first)."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    lp = log_softmax(logits)
    return TokenLogprob(int(token), float(lp[token]), _top(lp, top))


def _top(lp: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    k = min(k, lp.shape[-1])
    part = np.argpartition(-lp, k - 1)[:k]
    order = part[np.lexsort((part, -lp[part]))]
    return tuple((int(i), float(lp[i])) for i in order)

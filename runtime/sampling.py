"""Choosing the next token from a vector of logits: greedy, or drawn after repetition penalty,
temperature, top-k and top-p.

Each step has Hugging Face's semantics and order (RepetitionPenaltyLogitsProcessor, then the
Temperature, TopK and TopP warpers), so a sampled run here is statistically the run that
`transformers.generate` would make with the same settings; the tests compare against those
classes.  numpy only: running an artifact needs no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import numpy as np

from .errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens.  `temperature == 0` is greedy decoding; `top_k == 0` and
    `top_p == 1` switch those filters off; `seed` makes sampled runs repeatable."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        # Checked here, once, so that a bad request fails before any compute (the server turns
        # the RequestError into a 400 naming the field).
        if not (_finite(self.temperature) and self.temperature >= 0):
            raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), "
                             f"got {self.temperature!r}")
        if not (_integer(self.top_k) and self.top_k >= 0):
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (_finite(self.top_p) and 0 <= self.top_p <= 1):
            raise RequestError(f"top_p must be a number in [0, 1] (1 = off), got {self.top_p!r}")
        if not (_finite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise RequestError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                             f"got {self.repetition_penalty!r}")
        if not (self.seed is None or (_integer(self.seed) and self.seed >= 0)):
            raise RequestError(f"seed must be None or an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _finite(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL's penalty as HF applies it: each token already seen (counted once, however often)
    gets its logit divided by `penalty` if positive, multiplied if not.  Ids past the end of
    the logits (an embedding larger than the output head) cannot be generated and are skipped,
    as HF does."""
    out = np.array(logits, dtype=np.float64)
    if penalty == 1.0 or len(history) == 0:
        return out
    seen = np.unique(np.asarray(history, dtype=np.int64))
    if seen[0] < 0:
        raise ValueError(f"history holds a negative token id ({seen[0]})")
    seen = seen[seen < out.shape[-1]]
    score = out[seen]
    out[seen] = np.where(score > 0, score / penalty, score * penalty)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits, and every logit tied with the k-th (HF's TopKLogitsWarper);
    the rest become -inf.  k == 0 or k >= vocab keeps everything."""
    out = np.array(logits, dtype=np.float64)
    if k <= 0 or k >= out.shape[-1]:
        return out
    kth = np.partition(out, -k)[-k]
    out[out < kth] = -np.inf
    return out


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering as HF's TopPLogitsWarper: in ascending order (stable, so among equal
    logits the lower id goes first), drop tokens while the cumulative probability is <= 1 - p;
    the most likely token always stays."""
    out = np.array(logits, dtype=np.float64)
    if p >= 1.0:
        return out
    order = np.argsort(out, kind="stable")
    remove = np.cumsum(_softmax(out[order])) <= 1.0 - p
    remove[-1] = False
    out[order[remove]] = -np.inf
    return out


def distribution(logits: np.ndarray, params: SamplingParams, history: Sequence[int] = ()) -> np.ndarray:
    """The probabilities (float64, summing to 1) that `Sampler` draws from: penalty, temperature,
    top-k, top-p, softmax.  Greedy parameters give the one-hot vector of the greedy choice."""
    scores = _checked(logits)
    scores = apply_repetition_penalty(scores, history, params.repetition_penalty)
    if params.greedy:           # argmax takes the first of tied maxima, like torch.argmax
        probs = np.zeros_like(scores)
        probs[np.argmax(scores)] = 1.0
        return probs
    scores = top_k_filter(scores / params.temperature, params.top_k)
    return _softmax(top_p_filter(scores, params.top_p))


class Sampler:
    """Picks one token per call.  Owns its random generator, so one Sampler per sequence gives
    a reproducible run for a given seed regardless of what other sequences do."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        if self.params.greedy and (self.params.repetition_penalty == 1.0 or len(history) == 0):
            return greedy_choice(logits)
        probs = distribution(logits, self.params, history)
        if self.params.greedy:      # the one-hot of the greedy choice; no random draw is spent
            return int(np.argmax(probs))
        return int(self.rng.choice(probs.shape[0], p=probs))


def greedy_choice(logits) -> int:
    """argmax of the logits, with _checked's errors: what `distribution` picks for greedy
    parameters without a penalty, minus its float64 copies of a vocabulary-sized vector (SmolLM2's
    49,152 logits, Zen 3: 78 against 6 us a token, 2 % of a decode step; more on a busy machine).  One argmax finds every bad value: it
    stops at the first NaN, a +inf is the maximum, and an all -inf vector has -inf there."""
    scores = _vector(np.asarray(logits))
    i = int(np.argmax(scores))
    if not (-np.inf < scores[i] < np.inf):
        raise ValueError(NOT_FINITE)
    return i


def _checked(logits) -> np.ndarray:
    scores = _vector(np.asarray(logits, dtype=np.float64))
    if not (scores < np.inf).all() or scores.max() == -np.inf:     # NaN fails `< inf` too
        raise ValueError(NOT_FINITE)
    return scores


NOT_FINITE = "logits must be finite or -inf, with at least one finite value"


def _vector(scores: np.ndarray) -> np.ndarray:
    if scores.ndim != 1 or scores.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty vector, got shape {scores.shape}")
    return scores


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()

"""Sampling: each filter against its definition restated plainly, the whole chain against
transformers' own logits processors, and the sampler's draws against the distribution."""
from __future__ import annotations

import math

import numpy as np
import pytest

from amxc.runtime.sampling import (Sampler, SamplingParams, apply_repetition_penalty, distribution,
                                   top_k_filter, top_p_filter)


def random_logits(seed: int, vocab: int = 64, ties: bool = False) -> np.ndarray:
    """Logits on a normal scale; with `ties`, drawn from a few values so that many are equal."""
    rng = np.random.default_rng(seed)
    if ties:
        return rng.choice([-1.5, 0.0, 0.5, 2.0, 3.0], size=vocab).astype(np.float64)
    return rng.normal(0.0, 2.0, size=vocab)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


SEEDS = range(20)


# --- definitions restated ---------------------------------------------------------------------

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_is_the_first_argmax(seed, ties):
    logits = random_logits(seed, ties=ties)
    first_max = min(i for i, x in enumerate(logits) if x == max(logits))
    assert Sampler(SamplingParams())(logits) == first_max
    assert Sampler(SamplingParams(top_k=3, top_p=0.5))(logits) == first_max   # greedy ignores filters


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_keeps_the_k_largest_and_their_ties(seed, ties):
    logits = random_logits(seed, ties=ties)
    for k in (1, 2, 5, 63, 64, 100):
        kept = np.isfinite(top_k_filter(logits, k))
        threshold = sorted(logits, reverse=True)[min(k, len(logits)) - 1]
        assert kept.tolist() == [x >= threshold for x in logits]
        assert kept.sum() >= min(k, len(logits))
    assert np.isfinite(top_k_filter(logits, 0)).all()                       # 0 = off


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_top_p_keeps_the_smallest_nucleus(seed, ties):
    logits = random_logits(seed, ties=ties)
    probs = softmax(logits)
    for p in (0.0, 0.1, 0.5, 0.9, 0.99, 1.0):
        out = top_p_filter(logits, p)
        kept = np.isfinite(out)
        # Restated: walk from the most likely token (equal logits: the higher id first, the
        # mirror of HF's stable ascending sort) until the kept mass reaches p.
        order = sorted(range(len(logits)), key=lambda i: (logits[i], i), reverse=True)
        want, mass = set(), 0.0
        for i in order:
            if want and mass >= p - 1e-12:
                break
            want.add(i)
            mass += probs[i]
        assert set(np.flatnonzero(kept)) == want, p
        assert np.array_equal(out[kept], logits[kept])                   # kept logits untouched


@pytest.mark.parametrize("seed", SEEDS)
def test_repetition_penalty_is_hf_formula(seed):
    logits = random_logits(seed)
    rng = np.random.default_rng(seed + 100)
    history = rng.integers(0, 64, size=20).tolist() + [64, 999]     # ids past the logits are skipped
    out = apply_repetition_penalty(logits, history, 1.3)
    for i, x in enumerate(logits):
        want = (x / 1.3 if x > 0 else x * 1.3) if i in history else x
        assert out[i] == pytest.approx(want, rel=1e-15, abs=0)
    with pytest.raises(ValueError, match="negative"):
        apply_repetition_penalty(logits, [-1], 1.3)


def test_penalty_changes_the_greedy_choice():
    logits = np.array([0.0, 2.0, 1.9, -1.0])
    assert Sampler(SamplingParams(repetition_penalty=1.2))(logits, history=[1, 1, 3]) == 2


# --- against transformers' logits processors ---------------------------------------------------

def hf_probs(logits: np.ndarray, history, params: SamplingParams) -> np.ndarray:
    """HF's processors in `generate`'s order, in float64, then softmax."""
    import torch                      # the oracle (a core requirement): never skipped
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    chain = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    chain.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        chain.append(TopPLogitsWarper(params.top_p))
    ids = torch.tensor([history], dtype=torch.long)
    scores = chain(ids, torch.tensor(logits[None], dtype=torch.float64))
    return torch.softmax(scores, dim=-1)[0].numpy()


HF_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.5, top_k=10),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.2, top_k=20, top_p=0.7),
    dict(temperature=0.9, top_k=5, top_p=0.95, repetition_penalty=1.3),
    dict(temperature=1.0, repetition_penalty=0.8),
    dict(temperature=0.5, top_p=0.3, repetition_penalty=2.0),
]


@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", range(10))
def test_distribution_matches_transformers(case, seed):
    params = SamplingParams(**case)
    logits = random_logits(seed, vocab=200)
    history = np.random.default_rng(seed).integers(0, 200, size=30).tolist()
    ours, theirs = distribution(logits, params, history), hf_probs(logits, history, params)
    assert (ours > 0).tolist() == (theirs > 0).tolist()                   # same kept set
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert ours.dtype == np.float64 and ours.sum() == pytest.approx(1.0, abs=1e-12)


# --- the draws ---------------------------------------------------------------------------------

N_DRAWS = 20_000


def draw(params: SamplingParams, logits, n=N_DRAWS, history=()) -> np.ndarray:
    sampler = Sampler(params)
    return np.array([sampler(logits, history) for _ in range(n)])


def assert_frequencies_match(draws: np.ndarray, probs: np.ndarray):
    """Each token's empirical frequency within 5 standard errors (sqrt(p(1-p)/N)) of its
    probability.  Per token a 5-sigma miss has chance ~6e-7, so ~1e-5 over a 16-token vocabulary:
    a failure means a wrong distribution, not bad luck (and the seed is fixed anyway)."""
    freq = np.bincount(draws, minlength=len(probs)) / len(draws)
    sigma = np.sqrt(probs * (1 - probs) / len(draws))
    assert (np.abs(freq - probs) <= 5 * sigma + 1e-12).all(), (freq, probs)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_draws_follow_softmax(temperature):
    logits = random_logits(7, vocab=16) / 2
    draws = draw(SamplingParams(temperature=temperature, seed=1234), logits)
    assert_frequencies_match(draws, softmax(logits / temperature))


def test_top_k_draws_stay_in_the_top_k_and_renormalize():
    logits = random_logits(3, vocab=16) / 2
    draws = draw(SamplingParams(temperature=1.0, top_k=4, seed=99), logits)
    top4 = np.argsort(logits)[-4:]
    assert set(draws) <= set(top4)
    want = np.zeros(16)
    want[top4] = softmax(logits[top4])
    assert_frequencies_match(draws, want)


def test_top_p_draws_stay_in_the_nucleus():
    logits = random_logits(5, vocab=16) / 2
    params = SamplingParams(temperature=1.0, top_p=0.6, seed=5)
    nucleus = set(np.flatnonzero(np.isfinite(top_p_filter(logits, 0.6))))
    draws = draw(params, logits)
    assert set(draws) <= nucleus and len(nucleus) < 16
    assert_frequencies_match(draws, distribution(logits, params))


def test_same_seed_same_draws_different_seed_different():
    logits = random_logits(11, vocab=50)
    runs = [draw(SamplingParams(temperature=1.0, seed=s), logits, n=200) for s in (42, 42, 43)]
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams()], ids=["sampled", "greedy"])
def test_bad_logits_are_rejected(params):
    """Greedy takes its own path (one argmax, no float64 copies): the same errors."""
    sampler = Sampler(params)
    for bad in (np.array([]), np.zeros((2, 3)), np.array([0.0, np.nan]), np.array([np.inf, 0.0]),
                np.array([-np.inf, -np.inf]), np.array([2.0, np.nan, 1.0], np.float32),
                np.array([1.0, -np.inf, np.inf], np.float32)):
        with pytest.raises(ValueError, match="logits"):
            sampler(bad)
    assert sampler(np.array([-np.inf, 0.5, -np.inf], np.float32)) == 1     # the one finite logit


# --- parameters --------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "1"),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_p", -0.01), ("top_p", 1.01), ("top_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("seed", -1), ("seed", 1.5), ("seed", "7"),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_valid_edges_are_accepted():
    SamplingParams(temperature=0, top_k=0, top_p=0.0, repetition_penalty=1e-3, seed=0)
    SamplingParams(temperature=5, top_k=1, top_p=1, repetition_penalty=10, seed=2**63)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.1).greedy

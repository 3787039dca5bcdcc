"""Logprobs from the scheduler (what the server's `logprobs`, `top_logprobs` and `echo` report)
against the oracle: torch's log-softmax (not amxc's) of one whole-prompt prefill's logits
(Engine.logits), in float64.

Tolerance 1e-4 on log-probabilities of the exact path: the scheduler computes the same tokens
in chunks of another size and in decode steps, which the kernels make bit-identical on the
exact path (test_scheduler_models.py), so only float32 summation order could differ."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from amxc.backends.program import NativeOptions, NativeProgram
from amxc.runtime.artifact import load_artifact
from amxc.runtime.engine import Engine
from amxc.runtime.errors import RequestError
from amxc.runtime.logprobs import token_logprob
from amxc.runtime.tokenizer import Tokenizer

TOL = 1e-4


def log_softmax(logits) -> np.ndarray:
    return torch.log_softmax(torch.as_tensor(np.asarray(logits, np.float64)), dim=-1).numpy()


@pytest.fixture(scope="module")
def engine(stories_art):
    module, manifest = load_artifact(stories_art)
    program = NativeProgram(module, NativeOptions(gemv="exact"))
    return Engine(module, manifest, Tokenizer.from_dir(stories_art / "tokenizer"), program=program,
                  max_batch_tokens=8, kv_tokens=1024)


def run(e: Engine, prompt, **kw):
    s = e.scheduler
    rid = s.add_request(prompt, **kw)
    events = []
    while not s.requests[rid].finished:
        events += [ev for ev in s.step() if ev.request_id == rid]
    return s.release(rid), events


def test_token_logprob_top_is_sorted_and_contains_the_argmax():
    logits = np.array([0.5, 2.0, 2.0, -1.0, 3.0])
    lp = token_logprob(logits, 3, top=3)
    ref = log_softmax(logits)
    assert lp.logprob == pytest.approx(ref[3])
    assert [i for i, _ in lp.top] == [4, 1, 2]                 # ties: lower id first
    assert token_logprob(logits, 0, top=0).top == ()


def test_prompt_and_generated_logprobs_equal_the_log_softmax_of_one_prefill(engine):
    prompt = engine.tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved to play")
    req, events = run(engine, prompt, max_tokens=6, logprobs=3, prompt_logprobs=2)
    assert len(prompt) > 16                      # several prefill chunks, the last one a short tail
    whole = req.prompt_ids + req.output_ids
    ref = log_softmax(engine.logits(whole))       # row i scores token i + 1
    assert req.prompt_lps[0] is None and len(req.prompt_lps) == len(prompt)
    for pos in range(1, len(prompt)):
        lp = req.prompt_lps[pos]
        assert lp.token == prompt[pos] and lp.logprob == pytest.approx(ref[pos - 1, prompt[pos]], abs=TOL)
        best = np.argsort(-ref[pos - 1], kind="stable")[:2]
        assert [i for i, _ in lp.top] == list(best)
    assert [ev.logprob.token for ev in events] == req.output_ids
    for j, ev in enumerate(events):
        row = ref[len(prompt) - 1 + j]
        assert ev.logprob.logprob == pytest.approx(row[ev.token], abs=TOL)
        assert len(ev.logprob.top) == 3 and ev.logprob.top[0][0] == ev.token   # greedy: the argmax


def test_a_scored_prompt_skips_the_prefix_cache_but_max_tokens_zero_still_scores_it(engine):
    prompt = engine.tokenizer.encode("Tom had a red ball. He threw the ball to his dog, and the dog ran")
    run(engine, prompt, max_tokens=1)                            # caches the prompt's blocks
    req, events = run(engine, prompt, max_tokens=0, prompt_logprobs=0)
    assert req.output_ids == [] and req.finish_reason == "length" and events[-1].finish_reason == "length"
    assert req.stats.cached_tokens == 0 and len(req.prompt_lps) == len(prompt)
    ref = log_softmax(engine.logits(prompt))
    assert [p.logprob for p in req.prompt_lps[1:]] == pytest.approx(
        [ref[i, t] for i, t in enumerate(prompt[1:])], abs=TOL)
    plain, _ = run(engine, prompt, max_tokens=0)                 # no scoring: nothing computed
    assert plain.stats.computed_tokens == 0 and plain.prompt_lps == []


def test_a_one_token_prompt_has_only_the_empty_first_entry(engine):
    req, events = run(engine, [1], max_tokens=2, prompt_logprobs=1, logprobs=0)
    assert req.prompt_lps == [None] and len(events) == 2 and all(ev.logprob.top == () for ev in events)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_out_of_range_logprobs_are_refused(engine, field):
    with pytest.raises(RequestError, match=f"{field} must be between 0 and 20"):
        engine.scheduler.add_request([1, 2], **{field: 21})

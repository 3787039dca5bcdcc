"""The step scheduler's policy on a stand-in model that reads its whole context back from the
paged KV cache: its next token is a hash of every token stored at positions 0..p through the
block table.  So any wrong block table, a block shared that should not be, a prefix-cache hit
with the wrong contents, or a preempted request resumed from the wrong place changes the
tokens, and each request's tokens can be checked against the pure function of its prompt.

Policy checked: continuous batching (requests joining at later steps), chunked prefill under the
token budget with decode rows first, FCFS admission, preemption of the most recently admitted
request when blocks run out (nothing lost), "kv_full" for a request that cannot fit alone, a
clear error for a prompt that can never fit, abort freeing blocks at once, prefix-cache hits on
whole blocks only, stop strings cut and never streamed."""
from __future__ import annotations

import numpy as np
import pytest

from amxc.backends.step import kv_slots
from amxc.ir.dtypes import f32
from amxc.ir.types import KVCacheType
from amxc.runtime.errors import RequestError
from amxc.runtime.sampling import SamplingParams
from amxc.runtime.scheduler import Scheduler
from amxc.runtime.settings import Settings

VOCAB = 97
CACHE = KVCacheType(1, 1, 1, f32)


def next_token(tokens: list[int]) -> int:
    """The stand-in model: a position-weighted hash of the whole context."""
    t = np.asarray(tokens, np.int64)
    return int((t * (np.arange(len(t)) * 31 + 7)).sum() % VOCAB)


def solo(prompt: list[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(next_token(prompt + out))
    return out


class CacheReadingModel:
    """A program: stores each token's id as its 'key', then reads every key 0..p back."""
    name = "cache-reading"
    embed_rows = VOCAB

    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []      # (function, rows, tokens)

    def run(self, batch, k, v):
        self.calls.append((batch.function, batch.rows, batch.tokens))
        bs = k.shape[3]
        b, s = batch.ids.shape
        logits = np.zeros((b, s, VOCAB), np.float32)
        for r in range(b):
            blocks, offs = kv_slots(batch.block_tables[r], batch.positions[r], bs)
            k[0, blocks, 0, offs, 0] = batch.ids[r]
            for i in range(s):
                p = int(batch.positions[r, i])
                blocks, offs = kv_slots(batch.block_tables[r], np.arange(p + 1), bs)
                logits[r, i, next_token(k[0, blocks, 0, offs, 0].astype(np.int64).tolist())] = 1.0
        return logits if batch.logits == "all" else logits[:, -1]


def scheduler(**settings) -> Scheduler:
    return Scheduler(CacheReadingModel(), CACHE, Settings(**{"block_size": 4, **settings}))


def drain(s: Scheduler, arrivals: dict[int, list] | None = None, limit: int = 10_000) -> dict[int, list]:
    """Step until idle; arrivals[step] = [(prompt, n)] are added before that step.  Returns
    request id -> the tokens streamed for it."""
    arrivals = dict(arrivals or {})
    got: dict[int, list] = {}
    ids = {}
    for step in range(limit):
        for j, (prompt, n) in enumerate(arrivals.pop(step, [])):
            rid = s.add_request(prompt, max_tokens=n)
            ids[rid] = (prompt, n)
            got[rid] = []
        if not s.has_work and not arrivals:
            return got
        for ev in s.step():
            if ev.token is not None:
                got.setdefault(ev.request_id, []).append(ev.token)
        if s.last_step is not None:
            assert s.last_step.decode_rows + s.last_step.prefill_tokens <= s.settings.max_batch_tokens
    raise AssertionError("the scheduler did not finish")


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, VOCAB, n).tolist()


def test_staggered_requests_with_chunked_prefill_each_get_their_solo_tokens():
    s = scheduler(max_batch_tokens=16, kv_tokens=4096)
    arrivals = {step: [(prompt(n, seed=step * 10 + j), 12) for j, n in enumerate(lens)]
                for step, lens in {0: [1, 40], 3: [7], 4: [100, 2], 9: [33, 5, 64]}.items()}
    want = {}
    rid = 0
    for step in sorted(arrivals):
        for p, n in arrivals[step]:
            want[rid] = solo(p, n)
            rid += 1
    got = drain(s, arrivals)                            # (drain checks the budget of every step)
    assert got == want
    assert max(t for f, _, t in s.program.calls if f == "prefill") <= 16
    assert s.blocks.num_used == 0


def test_a_long_prompt_does_not_stall_running_streams():
    """While a 400-token prompt is prefilled in chunks, the running request gets a token at
    every step (decode rows go first in each step's budget)."""
    s = scheduler(max_batch_tokens=32, kv_tokens=4096)
    short = s.add_request(prompt(5, 1), max_tokens=40)
    s.step()                                            # short is prefilled and decoding
    long = s.add_request(prompt(400, 2), max_tokens=3)
    per_step = []
    while not s.requests[long].output_ids:
        events = s.step()
        per_step.append(sum(1 for e in events if e.request_id == short and e.token is not None))
    assert len(per_step) >= 400 // 32 and all(n == 1 for n in per_step)


def test_exhaustion_preempts_the_newest_and_loses_nothing():
    """Capacity for about 2 full sequences, 6 concurrent: every request still gets its solo
    tokens; requests were preempted and recomputed."""
    s = scheduler(max_batch_tokens=64, kv_tokens=64)       # 16 blocks of 4
    reqs = {j: (prompt(6 + j, seed=j), 24) for j in range(6)}
    got = drain(s, {0: list(reqs.values())})
    assert got == {j: solo(p, n) for j, (p, n) in reqs.items()}
    assert s.stats.preemptions > 0
    assert all(s.requests[j].finish_reason == "length" for j in reqs)
    assert s.blocks.num_used == 0


def test_the_preempted_request_is_the_most_recently_admitted():
    s = scheduler(max_batch_tokens=64, kv_tokens=32)       # 8 blocks
    a = s.add_request(prompt(6, 1), max_tokens=20)          # 26 positions each: one fits, two do not
    s.step()
    b = s.add_request(prompt(6, 2), max_tokens=20)
    while not s.stats.preemptions:
        s.step()
    assert s.requests[b].stats.preemptions == 1 and s.requests[a].stats.preemptions == 0
    drain(s)
    assert s.requests[a].output_ids == solo(prompt(6, 1), 20)
    assert s.requests[b].output_ids == solo(prompt(6, 2), 20)


def test_a_request_that_cannot_fit_alone_ends_kv_full_and_one_that_never_fits_is_refused():
    s = scheduler(max_batch_tokens=64, kv_tokens=16)       # 4 blocks of 4: 16 positions
    rid = s.add_request(prompt(5, 3), max_tokens=100)
    got = drain(s)
    r = s.requests[rid]
    assert r.finish_reason == "kv_full" and got[rid] == solo(prompt(5, 3), 12)   # 16 positions + 1
    with pytest.raises(RequestError, match=r"the prompt is 16 tokens and the KV cache holds 16 \(4 blocks of 4\): "
                                           r"it can never fit"):
        s.add_request(prompt(16, 4), max_tokens=1)
    assert s.blocks.num_used == 0 and not s.has_work


def test_abort_frees_blocks_at_once():
    s = scheduler(kv_tokens=256)
    rid = s.add_request(prompt(30, 5), max_tokens=50)
    s.step()
    s.step()
    assert s.blocks.num_used > 0
    s.abort(rid)
    assert s.blocks.num_used == 0 and s.requests[rid].finish_reason == "abort" and not s.has_work
    waiting = s.add_request(prompt(3, 6), max_tokens=5)
    s.abort(waiting)                                    # never admitted
    assert s.requests[waiting].finish_reason == "abort" and not s.has_work


def test_prefix_cache_reuses_whole_blocks_and_keeps_the_tokens():
    s = scheduler(kv_tokens=1024)
    shared = prompt(40, 7)
    first = s.add_request(shared + [5, 6, 7], max_tokens=6)
    drain(s)
    computed_before = s.requests[first].stats.computed_tokens
    second = s.add_request(shared + [9, 9], max_tokens=6)
    drain(s)
    r = s.requests[second]
    assert r.stats.cached_tokens == 40                   # 10 whole blocks of 4
    assert r.stats.computed_tokens == 2 + 5              # the tail, then 5 decode steps
    assert computed_before == 43 + 5
    assert r.output_ids == solo(shared + [9, 9], 6)
    # a prompt that is all cached still computes its last token (its block is never shared)
    third = s.add_request(shared, max_tokens=3)
    drain(s)
    assert s.requests[third].stats.cached_tokens == 36 and s.requests[third].output_ids == solo(shared, 3)
    assert s.blocks.stats.hit_tokens == 76 and s.blocks.num_used == 0 and s.blocks.num_cached > 0


def test_prefix_caching_off_computes_everything():
    s = scheduler(kv_tokens=1024, prefix_caching=False)
    shared = prompt(40, 7)
    for tail in ([1], [2]):
        rid = s.add_request(shared + tail, max_tokens=2)
        drain(s)
        assert s.requests[rid].stats.cached_tokens == 0
    assert s.blocks.num_cached == 0


def test_evicted_prefix_blocks_are_recomputed_correctly():
    """With room for little more than one request, the cached blocks of finished requests are
    evicted (least recently freed first) and reused: tokens stay right."""
    s = scheduler(kv_tokens=48, max_batch_tokens=64)     # 12 blocks
    for j in range(8):
        p = prompt(20, seed=100 + j % 2)                  # two prompts, alternating
        rid = s.add_request(p, max_tokens=8)
        drain(s)
        assert s.requests[rid].output_ids == solo(p, 8)
    assert s.blocks.stats.evictions > 0 and s.blocks.stats.hit_tokens > 0


def test_sampling_parameters_are_per_request():
    s = scheduler(kv_tokens=1024)
    p = prompt(8, 9)
    greedy = s.add_request(p, max_tokens=10)
    hot = s.add_request(p, SamplingParams(temperature=50.0, seed=1), max_tokens=10)
    drain(s)
    assert s.requests[greedy].output_ids == solo(p, 10)
    assert s.requests[hot].output_ids != solo(p, 10)


class Letters:
    """A tokenizer whose token i is the letter chr(97 + i % 26), streamed one by one."""
    eos_token_ids = frozenset()

    def stream(self, context=()):
        class D:
            def push(self, t):
                return chr(97 + t % 26)

            def flush(self):
                return ""
        return D()


def test_stop_strings_are_cut_and_never_streamed():
    p = prompt(8, 11)
    text = "".join(chr(97 + t % 26) for t in solo(p, 40))
    stop = text[20:23]
    cut = text.index(stop)
    s = Scheduler(CacheReadingModel(), CACHE, Settings(block_size=4), tokenizer=Letters())
    rid = s.add_request(p, max_tokens=40, stop_strings=[stop])
    streamed = ""
    while s.has_work:
        for ev in s.step():
            streamed += ev.text
            assert stop not in streamed
    assert s.requests[rid].finish_reason == "stop" and streamed == text[:cut] == s.requests[rid].text


def test_bad_requests_are_refused_before_any_step():
    s = scheduler()
    with pytest.raises(RequestError, match="empty prompt"):
        s.add_request([], max_tokens=3)
    with pytest.raises(RequestError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        s.add_request([1, 97], max_tokens=3)
    with pytest.raises(RequestError, match="stop strings need a tokenizer"):
        s.add_request([1], max_tokens=3, stop_strings=["x"])
    assert not s.has_work and not s.program.calls


def test_a_requests_token_span_equals_slicing_its_tokens():
    from amxc.runtime.scheduler import Request
    r = Request(0, [5, 6, 7], SamplingParams(), 10, frozenset(), output_ids=[8, 9])
    for start in range(6):
        for stop in range(start, 7):
            assert r.span(start, stop) == r.tokens[start:stop], (start, stop)

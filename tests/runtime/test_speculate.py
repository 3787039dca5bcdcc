"""Speculative decoding by prompt lookup (runtime/speculate.py, Scheduler._draft/_verify).

Greedy output must be plain decoding's token for token (the drafted rows are decode rows, and
a decode row's bits do not depend on its step's other rows); sampled output must keep its
distribution (the rejection rule, checked on the rule itself by frequency)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amxc.runtime.engine import Engine
from amxc.runtime.settings import Settings
from amxc.runtime.speculate import Drafter, Speculation, StepCost, suffix_match


def test_prompt_lookup_takes_the_longest_suffix_and_its_latest_occurrence():
    t = np.array([5, 6, 7, 8, 1, 2, 3, 9, 9, 1, 2, 3, 4, 4, 7, 1, 2, 3])
    # suffix [1, 2, 3] occurred at 4 and 9; the latest ends at 12 and is followed by 4 4 7
    assert suffix_match(t, 16, 2) == (12, 3)
    assert suffix_match(t, 2, 2) == (12, 2)                  # [2, 3] at most
    # [9, 7] never occurred before; with n_min=1 its last token 7 did (at 2 and 14): 8 ...
    t2 = np.array([5, 6, 7, 8, 1, 9, 7])
    assert suffix_match(t2, 16, 2) == (0, 0)
    assert suffix_match(t2, 16, 1) == (3, 1)
    assert suffix_match(np.array([3]), 16, 2) == (0, 0)      # nothing before the suffix
    assert suffix_match(np.array([1, 1, 1, 1]), 16, 2) == (3, 3)   # overlapping: [1,1,1] at 0


def _suffix_match_by_definition(t: list[int], n_max: int, n_min: int) -> tuple[int, int]:
    """Every length from n_max down, every earlier window: the definition, slowly."""
    for n in range(min(n_max, len(t) - 1), n_min - 1, -1):
        ends = [e for e in range(n, len(t)) if t[e - n:e] == t[len(t) - n:]]
        if ends:
            return ends[-1], n
    return 0, 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 20), st.integers(1, 4))
def test_suffix_match_is_the_longest_latest_earlier_occurrence(t, n_max, n_min):
    assert suffix_match(np.array(t, np.int64), n_max, n_min) == _suffix_match_by_definition(t, n_max, n_min)


def test_prompt_lookup_drafts_at_most_half_its_match():
    """A 2- or 3-token match drafts 1 token, a 6-token one 3, a long one up to K: a short match
    is a guess, a long one a copy (Drafter's docstring has the measured rates)."""
    passage = list(range(100, 140))
    d = Drafter(Speculation(tokens=6))
    assert d.propose([7, 8, 9, 1, 2, 5, 1, 2], 16) == [5]                   # [1, 2]: 2 tokens
    assert d.propose(passage + [0] + passage[:6], 16) == passage[6:9]       # 6 tokens: 3
    assert d.propose(passage + [0] + passage[:20], 16) == passage[20:26]    # 16: up to K = 6
    assert d.propose(passage + [0] + passage[:20], 4) == passage[20:24]     # and the room left


def test_speculation_spec_is_checked():
    assert Speculation.parse("ngram").tokens == 6
    assert Speculation.parse("ngram:7").tokens == 7
    assert Speculation.parse(None) is None and Speculation.parse("off") is None
    for bad in ("ngram:0", "ngram:99", "draft", "ngram:x", "ngram 3"):
        with pytest.raises(ValueError, match="--speculate"):
            Speculation.parse(bad)
    with pytest.raises(ValueError, match="--speculate"):
        Settings(speculate="ngram:0")


def test_drafter_shortens_and_pauses_after_misses():
    d = Drafter(Speculation(tokens=4))
    d.record(4, 0)
    assert d.length == 2
    d.record(2, 0)
    d.record(1, 0)
    assert d.length == 1 and d.pause == Drafter.REST
    assert [d.propose([1, 2, 1, 2, 1, 2], 8) for _ in range(Drafter.REST)] == [[]] * Drafter.REST
    assert d.propose([1, 2, 1, 2, 1, 2], 8) == [1]
    d.record(1, 0)                                   # the probe missed too: a rest twice as long
    assert d.pause == 2 * Drafter.REST
    d.pause = 0
    d.record(1, 1)                                   # a hit: rests start over, drafts lengthen
    assert d.length == 2 and d.rest == Drafter.REST and (d.drafted, d.accepted) == (9, 1)
    for _ in range(10):
        d.length = 1
        d.record(1, 0)
    assert d.pause == Drafter.MAX_REST                # rests stop doubling at MAX_REST


def _measured(one_row: float) -> StepCost:
    cost = StepCost()
    for _ in range(StepCost.MIN_SEEN):
        cost.observe(1, one_row)
    return cost


def test_drafting_that_costs_more_than_it_gives_rests():
    """Half the drafted tokens taken is a good rate, but not where a 5-row step costs 4 one-row
    steps (3 tokens for 4): the sequence rests, then probes with one token."""
    d = Drafter(Speculation(tokens=4), _measured(0.010))
    tokens = [1, 2, 1, 2, 1, 2]
    for _ in range(3):                                       # worth 1.5 (prior) -> 1.01
        assert len(d.propose(tokens, 8)) >= 1
        d.record(4, 2, seconds=0.040)
    assert 1 < d.worth < Drafter.PAYS                        # breaking even is not paying
    assert [d.propose(tokens, 8) for _ in range(1 + Drafter.REST)] == [[]] * (1 + Drafter.REST)
    assert d.propose(tokens, 8) == [1]
    # the same acceptance where a 5-row step costs 1.5 one-row steps keeps drafting
    d = Drafter(Speculation(tokens=4), _measured(0.010))
    for _ in range(10):
        d.record(4, 2, seconds=0.015)
    assert d.worth > 1.5 and len(d.propose(tokens, 8)) >= 1
    # a step shared with other sequences (seconds=None) says nothing about this one's cost
    d.record(4, 0, seconds=None)
    assert d.worth > 1.5


def test_step_cost_takes_medians_of_measured_steps():
    c = StepCost()
    c.observe(1, 0.010)
    assert c.one_row() is None and c.ratios() == {}          # too few to say
    for _ in range(2):
        c.observe(1, 0.010)
    for t in (0.030, 0.030, 0.031, 1.0):                     # a stray slow step: the median holds
        c.observe(5, t)
    assert c.one_row() == pytest.approx(0.010) and c.ratios()[5] == pytest.approx(3.05)
    for _ in range(StepCost.WINDOW):
        c.observe(1, 0.020)
    assert c.one_row() == pytest.approx(0.020)                # only the last WINDOW count


COPY_PROMPT = ("Copy the text exactly.\nText: {0}\nCopy: {1}")


def _passage(shared_eval, chars=500):
    text = (shared_eval / "tinystories_dev.txt").read_text()
    return text[:chars]


@pytest.mark.parametrize("art", ["stories_art", "smollm2_nf4_art"])
def test_greedy_speculation_gives_plain_decodings_tokens(art, request, shared_eval):
    path = request.getfixturevalue(art)
    passage = _passage(shared_eval)
    prompts = [COPY_PROMPT.format(passage, passage[:60]), "Once upon a time"]
    plain = Engine.load(path)
    spec = Engine.load(path, speculate="ngram:5")
    drafted = accepted = 0
    for prompt in prompts:
        want = plain.generate(prompt, max_new_tokens=48, ignore_eos=True)
        got = spec.generate(prompt, max_new_tokens=48, ignore_eos=True)
        assert got.ids == want.ids, prompt[:30]
        assert len(got.ids) == 48 and got.finish_reason == "length"
        assert 0 <= got.accepted_tokens <= got.drafted_tokens
        drafted, accepted = drafted + got.drafted_tokens, accepted + got.accepted_tokens
        if prompt.startswith("Copy"):
            # the copy runs ahead of plain decoding: fewer steps than tokens
            assert len(spec.last_timings.decode) < len(plain.last_timings.decode)
    assert accepted > 0
    assert any(rows > 1 for rows in spec.scheduler.step_cost.seconds)   # drafted steps were timed


def test_speculation_stops_at_max_tokens_and_stop_ids(stories_art, shared_eval):
    passage = _passage(shared_eval)
    prompt = COPY_PROMPT.format(passage, passage[:60])
    plain, spec = Engine.load(stories_art), Engine.load(stories_art, speculate="ngram:8")
    want = plain.generate(prompt, max_new_tokens=40, ignore_eos=True)
    for n in (1, 2, 7, 13):                  # a draft may not run past max_new_tokens
        got = spec.generate(prompt, max_new_tokens=n, ignore_eos=True)
        assert got.ids == want.ids[:n]
    stop = want.ids[20]
    first = want.ids.index(stop)
    got = spec.generate(prompt, max_new_tokens=40, stop=[stop])
    assert got.ids == want.ids[:first + 1] and got.finish_reason == "stop"


def test_sampled_speculation_gives_plain_decodings_tokens_for_a_seed(stories_art, shared_eval):
    """A drafted token is kept only where the row's own draw (one per emitted token, as in plain
    decoding) equals it: the rejection rule's distribution, and the same tokens for a seed --
    whatever the drafts were, which depend on measured step times."""
    passage = _passage(shared_eval)
    prompt = COPY_PROMPT.format(passage, passage[:60])
    plain, spec = Engine.load(stories_art), Engine.load(stories_art, speculate="ngram:4")
    for seed, temperature in ((3, 0.7), (4, 1.0)):
        want = plain.generate(prompt, max_new_tokens=32, temperature=temperature, seed=seed, ignore_eos=True)
        got = [spec.generate(prompt, max_new_tokens=32, temperature=temperature, seed=seed, ignore_eos=True)
               for _ in range(2)]
        assert [g.ids for g in got] == [want.ids] * 2 and len(want.ids) == 32
        assert all(g.drafted_tokens > 0 for g in got)
        assert len(set(want.ids)) > 8                # sampled text, not one repeated token


def test_no_drafts_when_many_sequences_decode(stories_art):
    prompt = "Tom said: the cat sat. the cat sat. the cat sat. the cat"      # all prefilled in one step
    spec = Engine.load(stories_art, speculate="ngram:4")
    many = spec.generate([prompt] * 5, max_new_tokens=16, ignore_eos=True)     # max_batch is 4
    assert all(g.drafted_tokens == 0 for g in many)
    few = spec.generate([prompt] * 2, max_new_tokens=16, ignore_eos=True)
    assert all(g.drafted_tokens > 0 for g in few)
    assert [g.ids for g in few] == [many[0].ids] * 2


def test_drafts_never_cause_a_preemption(stories_art):
    """A KV cache with room for just the two sequences: drafting (which takes blocks only when
    a block per running sequence stays free) neither preempts nor changes a token."""
    prompts = ["Tom said: the cat sat. the cat sat. the cat sat. the cat",
               "Lily saw a dog. Lily saw a dog. Lily saw a dog. Lily"]
    kw = dict(kv_tokens=16 * 12, block_size=16)
    plain = Engine.load(stories_art, **kw)
    spec = Engine.load(stories_art, speculate="ngram:8", **kw)
    new = 60                                 # each sequence ends inside its sixth block
    want = plain.generate(prompts, max_new_tokens=new, ignore_eos=True)
    got = spec.generate(prompts, max_new_tokens=new, ignore_eos=True)
    assert [g.ids for g in got] == [g.ids for g in want]
    assert sum(g.drafted_tokens for g in got) > 0
    assert plain.scheduler.stats.preemptions == 0
    assert spec.scheduler.stats.preemptions == 0


# -- draft-model drafting (--speculate draft:ART) ---------------------------------------------------
def test_draft_spec_is_parsed():
    s = Speculation.parse("draft:/models/small.amxc")
    assert (s.tokens, s.draft) == (4, "/models/small.amxc")
    assert Speculation.parse("draft:6:/a:b/c.amxc") == Speculation(tokens=6, draft="/a:b/c.amxc")
    for bad in ("draft:", "draft:0:/x", "draft:16:/x"):
        with pytest.raises(ValueError, match="--speculate"):
            Speculation.parse(bad)


@pytest.fixture(scope="module")
def stories_nf4_draft(tmp_path_factory, stories_dir):
    """stories260K in NF4: a draft of the same tokenizer for the f32 stories260K target."""
    from amxc.api import compile
    return compile(stories_dir, tmp_path_factory.mktemp("draft") / "stories-nf4.amxc",
                   quant="nf4{method=rtn}", progress=False)


def test_greedy_draft_model_gives_plain_decodings_tokens(stories_art, stories_nf4_draft, shared_eval):
    """Greedy output is plain decoding's whatever the draft proposes; a 4-bit draft of the same
    model agrees often enough that the sequence takes fewer steps than tokens."""
    plain = Engine.load(stories_art)
    spec = Engine.load(stories_art, speculate=f"draft:4:{stories_nf4_draft}")
    for prompt in ("Once upon a time", _passage(shared_eval, 200)):
        want = plain.generate(prompt, max_new_tokens=40, ignore_eos=True)
        got = spec.generate(prompt, max_new_tokens=40, ignore_eos=True)
        assert got.ids == want.ids, prompt[:30]
        assert 0 < got.accepted_tokens <= got.drafted_tokens
        assert len(spec.last_timings.decode) < len(plain.last_timings.decode)
    want = plain.generate("Once upon a time", max_new_tokens=8, ignore_eos=True)
    for n in (1, 3, 8):                                # drafts stop at max_new_tokens
        assert spec.generate("Once upon a time", max_new_tokens=n, ignore_eos=True).ids == want.ids[:n]


def test_sampled_draft_model_speculation_is_repeatable(stories_art, stories_nf4_draft):
    spec = Engine.load(stories_art, speculate=f"draft:{stories_nf4_draft}")
    a = spec.generate("Once upon a time", max_new_tokens=24, temperature=0.8, seed=5, ignore_eos=True)
    b = spec.generate("Once upon a time", max_new_tokens=24, temperature=0.8, seed=5, ignore_eos=True)
    assert a.ids == b.ids and len(a.ids) == 24 and a.drafted_tokens > 0


def test_draft_model_of_another_tokenizer_is_refused(stories_art, smollm2_nf4_art, tmp_path):
    from amxc.runtime.artifact import ArtifactError
    with pytest.raises(ArtifactError, match="draft.*(vocabulary|tokenizer)"):
        Engine.load(stories_art, speculate=f"draft:{smollm2_nf4_art}")
    with pytest.raises(ArtifactError, match="not an amxc artifact"):
        Engine.load(stories_art, speculate=f"draft:{tmp_path}")
    import shutil
    other = shutil.copytree(stories_art, tmp_path / "other.amxc")        # same vocabulary size,
    tok = other / "tokenizer" / "tokenizer.json"                          # another tokenizer.json
    tok.write_text(tok.read_text() + " ")
    with pytest.raises(ArtifactError, match="tokenizer.json differs"):
        Engine.load(stories_art, speculate=f"draft:{other}")

"""Speculative decoding by prompt lookup (runtime/speculate.py, Scheduler._draft/_verify).

Greedy output must be plain decoding's token for token (the drafted rows are decode rows, and
a decode row's bits do not depend on its step's other rows); sampled output must keep its
distribution (the rejection rule, checked on the rule itself by frequency)."""
from __future__ import annotations

import numpy as np
import pytest

from amxc.runtime.engine import Engine
from amxc.runtime.settings import Settings
from amxc.runtime.speculate import Drafter, Speculation, accept_or_resample, propose_ngram


def test_prompt_lookup_takes_the_longest_suffix_and_its_latest_occurrence():
    t = np.array([5, 6, 7, 8, 1, 2, 3, 9, 9, 1, 2, 3, 4, 4, 7, 1, 2, 3])
    # suffix [1, 2, 3] occurred at 4 and 9; the latest (9) is followed by 4 4 7
    assert propose_ngram(t, 3) == [4, 4, 7]
    assert propose_ngram(t, 10) == [4, 4, 7, 1, 2, 3]       # what follows, up to the end
    # [9, 7] never occurred before; with n_min=1 its last token 7 did (at 2 and 14): 8 ...
    t2 = np.array([5, 6, 7, 8, 1, 9, 7])
    assert propose_ngram(t2, 2, n_min=2) == []
    assert propose_ngram(t2, 2, n_min=1) == [8, 1]
    assert propose_ngram(np.array([3]), 4) == []             # nothing before the suffix
    assert propose_ngram(np.array([1, 1, 1, 1]), 2) == [1]   # overlapping: [1,1] at 1 is followed by 1


def test_speculation_spec_is_checked():
    assert Speculation.parse("ngram").tokens == 4
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
    assert d.length == 1 and d.pause == 4
    assert [d.propose([1, 2, 1, 2, 1, 2], 8) for _ in range(4)] == [[]] * 4     # paused
    assert d.propose([1, 2, 1, 2, 1, 2], 8) == [1]
    d.record(1, 1)
    assert d.length == 2 and (d.drafted, d.accepted) == (8, 1)


def test_rejection_rule_keeps_the_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    rng = np.random.default_rng(0)
    for draft in (0, 1, 3):
        draws = np.bincount([accept_or_resample(probs, draft, rng) for _ in range(20000)], minlength=4) / 20000
        assert np.abs(draws - probs).max() < 0.015, (draft, draws)
    assert accept_or_resample(np.array([0.0, 1.0]), 1, rng) == 1


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


def test_sampled_speculation_runs_and_is_repeatable(stories_art, shared_eval):
    passage = _passage(shared_eval)
    prompt = COPY_PROMPT.format(passage, passage[:60])
    spec = Engine.load(stories_art, speculate="ngram:4")
    a = spec.generate(prompt, max_new_tokens=32, temperature=0.7, seed=3, ignore_eos=True)
    b = spec.generate(prompt, max_new_tokens=32, temperature=0.7, seed=3, ignore_eos=True)
    assert a.ids == b.ids and len(a.ids) == 32 and a.drafted_tokens > 0


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

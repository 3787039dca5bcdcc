"""Speculative decoding: guess the next few tokens cheaply, check them all in one step.

A decoding sequence whose next tokens can be guessed (a draft of K tokens) runs its last token
and the K drafted ones as K + 1 rows of one decode step, each row at its own position and all
on the sequence's blocks.  A decode step writes every row's keys and values before any row
attends (ir/ops/cache.py, the native attention kernel), so row j sees the drafted tokens before
it exactly as if they had been decoded one by one; and a decode row's result does not depend on
how many rows share its step (backends/plan.py), so the logits of each row are, bit for bit,
the ones plain decoding would have computed had it produced the same tokens.  The scheduler
then walks the rows (Scheduler._verify): each row's token is chosen exactly as plain decoding
chooses it (argmax, or one draw from the row's distribution by the sequence's own generator),
and the walk stops at the first that differs from the draft.  Greedy output is therefore plain
decoding's.  So is sampled output for the same seed: a token costs one draw whether it was
drafted or not, and rows after a miss are dropped undrawn.  For a draft that is one token with
certainty this keeps d with probability p(d) and otherwise gives a draw from p without d: the
rejection rule of Leviathan et al. 2023 and Chen et al. 2023, so the output's distribution is
unchanged.  Either way the row after the last accepted token gives one more token, so a step
yields 1 to K + 1 tokens.

Drafts come from prompt lookup (`ngram`, Saxena 2023; vLLM's `ngram` speculator): the longest
suffix of the sequence, of `n_max` down to `n_min` tokens, that occurred before; its most
recent earlier occurrence proposes the tokens that followed it, at most half as many as the
match is long (a long match is likely to go on, a short one is a guess).  It pays where output copies
its input (rewriting, extraction, code edits, continuing a quoted passage) and costs nothing to
draft.  Verification is not free: K + 1 rows take longer than one, so speculation stops when
the batch is large (`max_batch` sequences decoding: the step is no longer bound by reading the
weights once), a sequence whose drafts keep failing drafts less, and one whose drafted steps
gave fewer tokens than their measured cost in one-row steps stops for a while (`Drafter`,
`StepCost`).

Or from a draft model (`draft:ART`, Leviathan et al. 2023): a smaller artifact with the same
tokenizer, run greedily for K tokens by its own engine in this process (`DraftModel`; its prefix
cache keeps each sequence's prefix, so a call computes only the tokens accepted since the last
one, then K decode steps).  Its proposal is deterministic, so the same verification applies
unchanged: greedy output is plain decoding's, sampled output keeps its distribution.  It pays
where the draft agrees with the target often and costs far less per token (a 4-bit draft of the
same model for an f32 or 8-bit target, a small model of the family for a large one); the step
time then includes the draft's (Scheduler.step).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_SPEC = re.compile(r"ngram(?::(\d+))?|draft:(?:(\d+):)?(.+)")
MAX_DRAFT = 15        # drafted tokens per step: with the row of the last token, one decode call
DRAFT_TOKENS = 4      # a draft model's default K


@dataclass(frozen=True)
class Speculation:
    """`amxc run|serve --speculate ngram[:K] | draft:[K:]ART`: draft up to K tokens by prompt
    lookup (default 6) or with the draft model ART (default 4), while at most `max_batch`
    sequences decode.  Prompt lookup drafts at most half its match's length (`Drafter`), so K
    only caps the drafts of long matches, which were taken 98 % of the time (below).  On SmolLM2
    NF4 (Zen 3, 2 threads), benchmarks/speculative_replay.py put K = 6 ahead of 5 by 0.02-0.05x
    in the input-grounded median under three of four measured step-cost tables (behind by 0.01
    under the fourth), free-form prompts at 0.99-1.00x either way; three timed runs gave
    K = 6 1.40-1.57x.  Rows are cheaper where they share AMX tiles, where a longer cap pays more.  Each
    token a draft model drafts costs one of its decode steps, so it keeps 4."""
    tokens: int = 6
    n_max: int = 16
    n_min: int = 2
    max_batch: int = 4
    draft: str | None = None          # the draft model's artifact (None: prompt lookup)

    @classmethod
    def parse(cls, spec: str | None) -> "Speculation | None":
        if spec is None or spec in ("", "off", "none"):
            return None
        m = _SPEC.fullmatch(spec.strip())
        if m is None:
            raise ValueError(f"--speculate {spec!r}: expected ngram, ngram:K, draft:ART or draft:K:ART "
                             f"(K drafted tokens, 1..{MAX_DRAFT}; ART a draft model's artifact)")
        count = m.group(1) or m.group(2)
        k = int(count) if count else cls.tokens if m.group(3) is None else DRAFT_TOKENS
        if not 1 <= k <= MAX_DRAFT:
            raise ValueError(f"--speculate {spec!r}: K must be 1..{MAX_DRAFT}, got {k}")
        return cls(tokens=k, draft=m.group(3))


def suffix_match(tokens: np.ndarray, n_max: int, n_min: int) -> tuple[int, int]:
    """The longest suffix of `tokens`, n_max down to n_min tokens long, that occurred before:
    (where its most recent earlier occurrence ends, exclusive; its length), or (0, 0) if none.
    One scan finds the n_min-token matches; each longer length keeps those whose next token
    back matches too, so the work is one pass plus n_max small filters."""
    t = np.asarray(tokens)
    size = t.shape[0]
    if not 1 <= n_min <= n_max or size <= n_min:
        return 0, 0
    # windows starting at 0 .. size - n_min - 1: every occurrence but the suffix itself
    starts = np.flatnonzero(t[:size - n_min] == t[size - n_min])
    for i in range(1, n_min):
        starts = starts[t[starts + i] == t[size - n_min + i]]
    if not starts.size:
        return 0, 0
    ends, n = starts + n_min, n_min
    while n < min(n_max, size - 1):
        longer = ends[ends > n]                       # room for one more token before it
        longer = longer[t[longer - n - 1] == t[size - n - 1]]
        if not longer.size:
            break
        ends, n = longer, n + 1
    return int(ends[-1]), n


class StepCost:
    """The time of a decode step by its row count, from the steps the scheduler ran: the median
    of the last `WINDOW` single-sequence, decode-only steps of each count (medians: a VM's stray
    slow step moves nothing), once `MIN_SEEN` were seen."""
    WINDOW = 16
    MIN_SEEN = 3

    def __init__(self):
        self.seconds: dict[int, list[float]] = {}

    def observe(self, rows: int, seconds: float) -> None:
        seen = self.seconds.setdefault(rows, [])
        seen.append(float(seconds))
        del seen[:-self.WINDOW]

    def median(self, rows: int) -> float | None:
        seen = self.seconds.get(rows, [])
        return float(np.median(seen)) if len(seen) >= self.MIN_SEEN else None

    def one_row(self) -> float | None:
        return self.median(1)

    def ratios(self) -> dict[int, float]:
        """Each measured count's step time over a one-row step's (for reports)."""
        one = self.one_row()
        return {} if not one else {r: m / one for r in sorted(self.seconds)
                                   if (m := self.median(r)) is not None}


class Drafter:
    """One sequence's drafting: prompt lookup, at most half as many tokens as its suffix match
    is long, its length adapted to what was accepted lately (one more after a full hit, halved
    after a miss, a rest after a miss at length 1), and stopped where drafting has not paid on
    this host.  A longer match is likelier to go on: on benchmarks/speculative.py's prompts
    (SmolLM2), a 2-token match's first token was taken 69 % of the time on input-grounded prompts
    and 48 % on free-form ones, a match of 16 or more 98 %; halving keeps a short match's miss
    cheap (a 2-row step costs 1.3 one-row steps on a Zen 3, a 5-row one 2.4-2.7), which took
    free-form prompts from 0.97x to 0.99-1.04x.  Each drafted step's worth is the tokens it gave
    over what it cost in one-row steps (`StepCost`, measured), and while the decayed average of
    that worth is under `PAYS` the sequence rests, then probes with one token.  Acceptance alone
    cannot say this: a 5-row step costs 1.3x a one-row step where the rows share AMX tiles and
    2.4-3x on an AVX2 host (issue #20 notes).  Rests double while probes keep failing (`REST` to
    `MAX_REST` steps), so free-form text pays for few of them; a taken token resets them."""
    REST = 4
    MAX_REST = 32
    DECAY = 0.7
    PRIOR_WORTH = 1.5             # a new sequence drafts: copying prompts pay from the start
    #: the worth drafting must keep: breaking even on the measured step costs still loses to
    #: what they leave out (proposing, the verification walk) and to their noise (free-form
    #: prompts ran 0.93-0.94x plain decoding at a threshold of 1: Zen 3, issue #20 note)
    PAYS = 1.1

    def __init__(self, spec: Speculation, cost: StepCost | None = None):
        self.spec = spec
        self.cost = cost or StepCost()
        self.length = spec.tokens
        self.pause = 0                # steps left without drafting
        self.rest = self.REST         # the next rest's length
        self.worth = self.PRIOR_WORTH
        self.drafted = 0
        self.accepted = 0

    def propose(self, tokens: list[int], room: int) -> list[int]:
        if self.pause > 0:
            self.pause -= 1
            return []
        if self.worth < self.PAYS:    # drafting has not paid: rest, then probe
            self.length, self.worth = 1, self.PAYS
            self._rest()
            return []
        k = min(self.length, room)
        if k < 1:
            return []
        return self._proposal(tokens, k)

    def _proposal(self, tokens: list[int], k: int) -> list[int]:
        t = np.asarray(tokens, np.int64)
        end, n = suffix_match(t, self.spec.n_max, self.spec.n_min)
        return t[end:end + min(k, max(1, n // 2))].tolist() if n else []

    def record(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        """`accepted` of `drafted` tokens were taken (a miss ends a draft early), in a step of
        `seconds` (None: not this sequence's alone, so its cost is not its own)."""
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        one = self.cost.one_row()
        if seconds is not None and one is not None:
            worth = (accepted + 1) * one / seconds
            self.worth = self.DECAY * self.worth + (1 - self.DECAY) * worth
        if accepted:
            self.rest = self.REST
        if accepted == drafted:
            self.length = min(self.spec.tokens, self.length + 1)
        elif accepted == 0:
            if self.length == 1:
                self._rest()
            self.length = max(1, self.length // 2)

    def _rest(self) -> None:
        self.pause, self.rest = self.rest, min(2 * self.rest, self.MAX_REST)


class ModelDrafter(Drafter):
    """Drafting by a draft model (`DraftModel`), its length chosen as prompt lookup's; the
    measured step cost includes the draft's time."""

    def __init__(self, spec: Speculation, model: "DraftModel", cost: StepCost | None = None):
        super().__init__(spec, cost)
        self.model = model

    def _proposal(self, tokens: list[int], k: int) -> list[int]:
        return self.model.propose(tokens, k)


class DraftModel:
    """A draft artifact's engine, proposing the greedy continuation of a token sequence."""

    def __init__(self, engine, path: str):
        self.engine, self.path = engine, path

    @staticmethod
    def check_compatible(path: str, vocab: tuple, tokenizers: tuple) -> None:
        """The draft at `path` must share the target's vocabulary: (draft, target) sizes equal,
        and (draft, target) tokenizer.json files equal where both have one (sizes first, so a
        huge file is never read); a draft that numbers tokens differently would only ever be
        rejected.  Raises ValueError naming the difference."""
        where = f"--speculate draft:{path}"
        if None not in vocab and int(vocab[0]) != int(vocab[1]):
            raise ValueError(f"{where}: the draft's vocabulary has {vocab[0]} tokens, the target's "
                             f"{vocab[1]}; a draft model must share the target's tokenizer")
        if None not in tokenizers and (tokenizers[0].stat().st_size != tokenizers[1].stat().st_size
                                       or tokenizers[0].read_bytes() != tokenizers[1].read_bytes()):
            raise ValueError(f"{where}: the draft's tokenizer.json differs from the target's; a draft "
                             f"model must share the target's tokenizer")

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k greedy tokens after `tokens` ([] where the draft's context ends first)."""
        from .errors import RequestError
        context = self.engine.context
        if context is not None and len(tokens) + k > context:
            return []
        try:
            g = self.engine.generate(list(tokens), max_new_tokens=k, ignore_eos=True,
                                     add_special_tokens=False)
        except RequestError:
            return []
        return list(g.ids[:k])

    def prime(self, prompt: list[int]) -> None:
        """Compute a prompt's keys and values in the draft while the target prefills it (the
        scheduler calls this in the step that completes the prompt), so the first drafting call
        finds them in the draft's prefix cache and the prompt's cost is counted as prefill."""
        self.propose(prompt, 1)

    def close(self) -> None:
        self.engine.close()

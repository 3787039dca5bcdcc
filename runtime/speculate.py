"""Speculative decoding: guess the next few tokens cheaply, check them all in one step.

A decoding sequence whose next tokens can be guessed (a draft of K tokens) runs its last token
and the K drafted ones as K + 1 rows of one decode step, each row at its own position and all
on the sequence's blocks.  A decode step writes every row's keys and values before any row
attends (ir/ops/cache.py, the native attention kernel), so row j sees the drafted tokens before
it exactly as if they had been decoded one by one; and a decode row's result does not depend on
how many rows share its step (backends/plan.py), so the logits of each row are, bit for bit,
the ones plain decoding would have computed had it produced the same tokens.  The scheduler
then walks the rows (Scheduler._verify): greedy decoding takes each row's argmax and stops at
the first that differs from the draft, so its output is plain decoding's; sampling accepts
drafted token d with probability p(d) and otherwise draws from p with d removed (the rejection
rule of Leviathan et al. 2023 and Chen et al. 2023 for a draft that is one token with
certainty), which leaves the distribution of the output unchanged.  Either way the row after
the last accepted token gives one more token, so a step yields 1 to K + 1 tokens.

Drafts come from prompt lookup (`ngram`, Saxena 2023; vLLM's `ngram` speculator): the longest
suffix of the sequence, of `n_max` down to `n_min` tokens, that occurred before; its most
recent earlier occurrence proposes the tokens that followed it.  It pays where output copies
its input (rewriting, extraction, code edits, continuing a quoted passage) and costs nothing to
draft.  Verification is not free: K + 1 rows take longer than one, so speculation stops when
the batch is large (`max_batch` sequences decoding: the step is no longer bound by reading the
weights once) and a sequence whose drafts keep failing drafts less (`Drafter`).

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


@dataclass(frozen=True)
class Speculation:
    """`amxc run|serve --speculate ngram[:K] | draft:[K:]ART`: draft up to K tokens (default 4)
    by prompt lookup or with the draft model ART, while at most `max_batch` sequences decode.  Measured on SmolLM2 NF4 (Zen 4, 2
    threads, benchmarks/speculative.py): K = 4 gave a 1.72x median on input-grounded prompts
    and 1.07x on free-form ones, K = 3 1.68x and 1.04x; a 5-row decode step costs 8.0 ms against
    6.5 at 4 rows and 3.2-4.5 at 1 (the GEMV reads the weights once for all rows)."""
    tokens: int = 4
    n_max: int = 3
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
        k = int(count) if count else cls.tokens
        if not 1 <= k <= MAX_DRAFT:
            raise ValueError(f"--speculate {spec!r}: K must be 1..{MAX_DRAFT}, got {k}")
        return cls(tokens=k, draft=m.group(3))


def propose_ngram(tokens: np.ndarray, k: int, n_max: int = 3, n_min: int = 2) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the longest suffix
    of `tokens` (n_max down to n_min tokens long); [] if none occurred."""
    t = np.asarray(tokens)
    size = t.shape[0]
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = t[size - n:]
        # windows starting at 0 .. size - n - 1: every occurrence but the suffix itself
        starts = np.flatnonzero(t[:size - n] == suffix[0])
        for i in range(1, n):
            starts = starts[t[starts + i] == suffix[i]]
        if starts.size:
            s = int(starts[-1]) + n
            return t[s:s + k].tolist()
    return []


class Drafter:
    """One sequence's drafting: prompt lookup, with the draft length adapted to how much of it
    was accepted lately (a sequence whose drafts fail drafts 1 token, then none for a while,
    so free-form text pays almost nothing)."""

    def __init__(self, spec: Speculation):
        self.spec = spec
        self.length = spec.tokens
        self.pause = 0                # steps left without drafting
        self.drafted = 0
        self.accepted = 0

    def propose(self, tokens: list[int], room: int) -> list[int]:
        if self.pause > 0:
            self.pause -= 1
            return []
        k = min(self.length, room)
        if k < 1:
            return []
        return self._proposal(tokens, k)

    def _proposal(self, tokens: list[int], k: int) -> list[int]:
        return propose_ngram(np.asarray(tokens, np.int64), k, self.spec.n_max, self.spec.n_min)

    def record(self, drafted: int, accepted: int) -> None:
        """`accepted` of `drafted` tokens were taken: lengthen after a full hit, shorten after a
        miss, and pause after a miss at length 1.  (Halving also when under half were taken
        was tried on a Zen 3: no free-form prompt changed, grounded ones lost up to 0.2x.)"""
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.length = min(self.spec.tokens, self.length + 1)
        elif accepted == 0:
            if self.length == 1:
                self.pause = 4
            self.length = max(1, self.length // 2)


class ModelDrafter(Drafter):
    """Drafting by a draft model (`DraftModel`), with prompt lookup's adaptive length."""

    def __init__(self, spec: Speculation, model: "DraftModel"):
        super().__init__(spec)
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


def accept_or_resample(probs: np.ndarray, draft: int, rng: np.random.Generator) -> int:
    """The rejection rule for a drafted token that was certain: keep `draft` with probability
    probs[draft], else draw from probs without it.  The result is distributed as probs."""
    if rng.random() < probs[draft]:
        return draft
    rest = probs.copy()
    rest[draft] = 0.0
    total = rest.sum()
    if total <= 0:                     # probs[draft] was 1 up to rounding
        return draft
    return int(rng.choice(rest.shape[0], p=rest / total))


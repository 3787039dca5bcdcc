"""The step scheduler: requests in, one batched step at a time, tokens out (vLLM's
add_request / step / abort).

Each step() decides what to compute, under a token budget (Settings.max_batch_tokens):
  1. every running request that is decoding (one new token each), FCFS;
  2. the next chunk of every running request that is still prefilling (chunked prefill: a long
     prompt takes several steps, and the decode rows of other requests go first in each);
  3. waiting requests, FCFS, while tokens, blocks and Settings.max_seqs allow (continuous
     batching: a new request joins at the next step).  A request's prompt is first looked up
     in the prefix cache, and only its uncached tail is computed.
When the blocks for the next tokens of a running request are not there, the most recently
admitted request is preempted: its blocks are released (they stay in the prefix cache until
evicted) and it waits at the head of the queue to be recomputed — nothing it generated is lost.
A request that cannot fit even alone ends with finish reason "kv_full", keeping its output.

The decode rows of a step run as one `decode` call (every weight streamed once for all rows),
each prefill chunk as one `prefill` call.  The native kernels compute each token the same way
whatever else is in its step, so batching does not change results (on the exact path, bit for
bit; on the int8-activation path a decode row's GEMV and a GEMM row differ by rounding).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from amxc.backends.step import StepBatch

from .blocks import BlockManager, block_key
from .errors import RequestError
from .kv_cache import KVStorage
from .logprobs import MAX_TOP_LOGPROBS, TokenLogprob, token_logprob
from .sampling import Sampler, SamplingParams
from .settings import Settings
from .speculate import Drafter, ModelDrafter, StepCost

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
_DECODE_CONTEXT = 4      # prompt tokens the text decoder sees before the first generated one


@dataclass
class RequestStats:
    arrival: float = 0.0
    first_token: float | None = None     # when the first generated token was sampled
    finished: float | None = None
    cached_tokens: int = 0               # prompt tokens taken from the prefix cache (first admission)
    computed_tokens: int = 0             # tokens run through the model for this request
    preemptions: int = 0
    drafted_tokens: int = 0              # speculative decoding: tokens drafted ...
    accepted_tokens: int = 0             # ... and how many of them were right (Generation.acceptance)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None           # report each generated token's logprob and this many top ones
    prompt_logprobs: int | None = None    # the same for the prompt's tokens (their first has none)
    output_ids: list[int] = field(default_factory=list)
    prompt_lps: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: str | None = None      # "stop", "length", "kv_full", "abort"
    status: str = WAITING
    # KV state
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)   # prefix-cache keys of the leading full blocks
    num_computed: int = 0                             # tokens whose keys and values are in `blocks`
    stats: RequestStats = field(default_factory=RequestStats)
    # text
    text: str = ""                        # generated text so far (stop strings cut off)
    emitted: int = 0                      # characters of `text` already handed out
    decoder: object = None
    sampler: Sampler | None = None
    # speculative decoding
    drafter: Drafter | None = None
    draft: list[int] = field(default_factory=list)    # this step's drafted tokens

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def span(self, start: int, stop: int) -> list[int]:
        """tokens[start:stop] without building the whole list (the decode hot path)."""
        p = len(self.prompt_ids)
        return self.prompt_ids[start:stop] + self.output_ids[max(start - p, 0):max(stop - p, 0)]

    @property
    def scoring_prompt(self) -> bool:
        """Its prompt's logprobs are wanted and not all known yet (each needs its position computed)."""
        return self.prompt_logprobs is not None and len(self.prompt_lps) < len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED


@dataclass
class Event:
    """What one step did for one request: a new token (None when it ended without one), the
    text that may now be shown (held back while it could still start a stop string), and the
    finish reason once it is done."""
    request_id: int
    token: int | None
    text: str
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None   # the token's, when the request asked for logprobs


@dataclass
class StepRecord:
    """One step, for timings: seconds (the whole step: scheduling, the native call, sampling),
    decode rows, prefill tokens, tokens the decode rows gave (more than the rows' sequences
    when drafted tokens were accepted), and the seconds after the native call (sampling and
    bookkeeping)."""
    seconds: float
    decode_rows: int
    prefill_tokens: int
    decoded_tokens: int = 0
    after_call: float = 0.0


@dataclass
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0


class Scheduler:
    def __init__(self, program, cache_type, settings: Settings, *, tokenizer=None, context: int | None = None,
                 draft_model=None):
        self.program, self.settings, self.tokenizer, self.context = program, settings, tokenizer, context
        self.draft_model = draft_model             # speculate.DraftModel for --speculate draft:ART
        self.blocks = BlockManager(settings.num_blocks, settings.block_size, settings.prefix_caching)
        self.storage = KVStorage(cache_type, settings.num_blocks, settings.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []             # admission order
        self.requests: dict[int, Request] = {}
        self.stats = SchedulerStats()
        self.last_step: StepRecord | None = None
        self.speculation = settings.speculation
        self.step_cost = StepCost()                 # what a decode step of m rows costs here
        self._next_id = 0

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    max_tokens: int = 16, stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                    logprobs: int | None = None, prompt_logprobs: int | None = None,
                    request_id: int | None = None) -> int:
        """Queue a request; it joins the batch at the next step.  Returns its id.  `logprobs`
        (`prompt_logprobs`): report the log-probability of each generated (prompt) token and of
        that many most likely tokens at its position; a prompt is scored even with
        max_tokens 0."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise RequestError("empty prompt")
        need = self.blocks.blocks_for(len(prompt) + 1)
        if need > self.blocks.num_blocks:
            raise RequestError(
                f"the prompt is {len(prompt)} tokens and the KV cache holds {self.blocks.capacity_tokens} "
                f"({self.blocks.num_blocks} blocks of {self.blocks.block_size}): it can never fit; allow more "
                f"KV tokens (--kv-tokens) or send a shorter prompt")
        vocab = getattr(self.program, "embed_rows", 0)
        if vocab and (min(prompt) < 0 or max(prompt) >= vocab):
            bad = min(prompt) if min(prompt) < 0 else max(prompt)
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if stop_strings and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this model has none: stop on token ids")
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise RequestError(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {k}")
        rid = self._next_id if request_id is None else int(request_id)
        if rid in self.requests:
            raise RequestError(f"request id {rid} is already in use")
        self._next_id = max(self._next_id, rid + 1)
        req = Request(rid, prompt, params or SamplingParams(), int(max_tokens), frozenset(stop_ids),
                      tuple(s for s in stop_strings if s), logprobs, prompt_logprobs)
        req.stats.arrival = time.perf_counter()
        req.sampler = Sampler(req.params)
        if self.speculation is not None:
            req.drafter = (ModelDrafter(self.speculation, self.draft_model, self.step_cost)
                           if self.draft_model is not None else Drafter(self.speculation, self.step_cost))
        if prompt_logprobs is not None:
            req.prompt_lps.append(None)           # the first token has no context to be scored in
        # the prompt's last tokens as context, so the text joins on as the prompt left it
        # (SentencePiece keeps the space before the first new word, as vLLM's detokenizer does)
        req.decoder = self.tokenizer.stream(prompt[-_DECODE_CONTEXT:]) if self.tokenizer is not None else None
        self.requests[rid] = req
        if req.max_tokens < 1 and prompt_logprobs is None:
            self._finish(req, "length")
        else:
            self.waiting.append(req)
        return rid

    def abort(self, request_id: int) -> None:
        """End a request now and give back its blocks (unknown or finished ids are ignored)."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        self._finish(req, "abort")

    def release(self, request_id: int) -> Request | None:
        """Forget a finished request (its result is returned)."""
        req = self.requests.get(request_id)
        if req is not None and req.finished:
            del self.requests[request_id]
        return req

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step --------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        events: list[Event] = []
        t0 = time.perf_counter()            # from scheduling on: a draft model drafts there
        plan = self._schedule(events)
        if not plan:
            return events
        rows = [1 + len(req.draft) for req, n in plan if n == 1]
        logits = self._execute(plan)
        seconds = time.perf_counter() - t0
        alone = len(plan) == len(rows) == 1               # one sequence decoding, alone: its cost
        if alone and self.speculation is not None:
            self.step_cost.observe(rows[0], seconds)
        self.stats.steps += 1
        decoded = 0
        for (req, n), row in zip(plan, logits):
            if n == 1 and req.draft:                      # a decode row and its drafted tokens
                decoded += self._verify(req, row, events, seconds if alone else None)
                continue
            decoded += n == 1
            req.num_computed += n
            req.stats.computed_tokens += n
            self._register_full_blocks(req)
            if req.num_computed < req.num_tokens:
                continue
            if req.max_tokens < 1:                        # a prompt scored, nothing to generate
                self.running.remove(req)
                events.append(self._finish(req, "length"))
            else:                                         # its last token was computed: sample
                events.append(self._sample(req, row))
        total = time.perf_counter() - t0
        self.last_step = StepRecord(total, sum(1 for _, n in plan if n == 1),
                                    sum(n for _, n in plan if n > 1), decoded, total - seconds)
        return events

    def _verify(self, req: Request, rows: np.ndarray, events: list[Event], seconds: float | None) -> int:
        """Take tokens from the rows of a drafted decode step (speculate.py): row j follows the
        last token and the first j drafted ones; walk them while the drafted token is what the
        row gives.  Returns how many tokens were taken.  `seconds`: the step's time where it was
        this sequence's alone (what drafting cost it), else None."""
        draft, req.draft = req.draft, []
        taken = accepted = 0
        for j, row in enumerate(rows):
            guess = draft[j] if j < len(draft) else None
            event = self._sample(req, row)
            events.append(event)
            req.num_computed += 1
            taken += 1
            accepted += guess is not None and event.token == guess
            if event.finish_reason is not None or event.token != guess:
                break
        req.stats.computed_tokens += len(rows)            # every row ran, taken or not
        req.drafter.record(len(draft), accepted, seconds)
        req.stats.drafted_tokens += len(draft)
        req.stats.accepted_tokens += accepted
        self.stats.drafted_tokens += len(draft)
        self.stats.accepted_tokens += accepted
        if not req.finished:
            self._register_full_blocks(req)
        return taken

    def _schedule(self, events: list[Event]) -> list[tuple[Request, int]]:
        budget = self.settings.max_batch_tokens
        plan: list[tuple[Request, int]] = []
        preempted = False
        decoding = [r for r in self.running if r.num_tokens - r.num_computed == 1]
        prefilling = [r for r in self.running if r.num_tokens - r.num_computed > 1]
        for req in decoding + prefilling:
            if budget == 0 or req.status != RUNNING:
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            # A victim is never a request planned earlier in this loop: it is the most recently
            # admitted, and a request admitted after one that is still prefilling cannot exist
            # (admission stops when a chunk takes the rest of a step's budget), so the victims
            # come after `req` in admission order, and decode rows precede prefill chunks.
            grown = self._grow(req, req.num_computed + n, events)
            assert all(r.status == RUNNING for r, _ in plan), "a planned request was preempted"
            if not grown:
                preempted = True
                continue
            plan.append((req, n))
            budget -= n
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.settings.max_seqs:
            req = self.waiting[0]
            tokens = req.tokens
            # the last token is always computed (its logits are needed), so its block is never shared
            # (a prompt being scored computes every position: its logprobs need each one's logits)
            limit = 0 if req.scoring_prompt else (len(tokens) - 1) // self.blocks.block_size
            hits, keys = self.blocks.lookup(tokens, limit=limit)
            cached = len(hits) * self.blocks.block_size
            n = min(len(tokens) - cached, budget)
            missing = self.blocks.blocks_for(cached + n) - len(hits)
            if not self.blocks.can_allocate(missing, hits):
                break
            self.waiting.popleft()
            self.blocks.acquire(hits)
            req.blocks, req.keys, req.num_computed = hits + self.blocks.allocate(missing), keys, cached
            if req.stats.preemptions == 0:
                req.stats.cached_tokens = cached
                self.blocks.stats.lookup_tokens += len(tokens)
                self.blocks.stats.hit_tokens += cached
                self.stats.prompt_tokens += len(tokens)
            req.status = RUNNING
            self.running.append(req)
            plan.append((req, n))
            budget -= n
        if self.speculation is not None and len(decoding) <= self.speculation.max_batch:
            for req, n in plan:              # last: drafts take only what nothing else needs
                if n == 1 and req in decoding:
                    budget -= self._draft(req, len(decoding), budget)
        if self.draft_model is not None:
            for req, n in plan:              # a prompt completed by this step: the draft reads it now,
                if req not in decoding and req.num_computed + n == req.num_tokens:   # in the prefill
                    self.draft_model.prime(req.tokens)
        return plan

    def _draft(self, req: Request, decoding: int, budget: int) -> int:
        """Draft tokens for a decoding request (speculate.py) where they can pay: few sequences
        decoding, room in what the step's budget, the context and max_tokens leave, and free KV
        blocks that the step's other requests did not need (drafts never preempt).  Returns how
        many were drafted (req.draft)."""
        req.draft = []
        spec = self.speculation
        if spec is None or req.drafter is None or decoding > spec.max_batch or req.scoring_prompt:
            return 0
        room = min(budget, req.max_tokens - len(req.output_ids) - 1,
                   (self.context or 1 << 30) - req.num_tokens)
        draft = req.drafter.propose(req.tokens, room)
        if not draft:
            return 0
        missing = self.blocks.blocks_for(req.num_computed + 1 + len(draft)) - len(req.blocks)
        if missing > 0 and missing > self.blocks.num_free - len(self.running):
            return 0        # keep a block for each running sequence's next token: no later preemption
        if missing > 0:
            req.blocks += self.blocks.allocate(missing)
        req.draft = draft
        return len(draft)

    def _grow(self, req: Request, tokens: int, events: list[Event]) -> bool:
        """Blocks for `tokens` positions of a running request, preempting the most recently
        admitted requests if need be.  False: `req` itself was preempted or ended."""
        missing = self.blocks.blocks_for(tokens) - len(req.blocks)
        while missing > self.blocks.num_free:
            victim = self.running[-1]
            if victim is req and len(self.running) == 1:     # alone and still no room: never fits
                self.running.remove(req)
                events.append(self._finish(req, "kv_full"))
                return False
            self._preempt(victim)
            if victim is req:
                return False
        if missing > 0:
            req.blocks += self.blocks.allocate(missing)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.release(req.blocks)
        req.blocks, req.keys, req.num_computed = [], [], 0
        req.status = WAITING
        req.stats.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(req)

    def _execute(self, plan: list[tuple[Request, int]]) -> list[np.ndarray]:
        """Logits of each planned request's last computed token (rows for mid-prompt chunks
        are computed and ignored)."""
        k, v = self.storage.k, self.storage.v
        out: list[np.ndarray | None] = [None] * len(plan)
        decode = [i for i, (_, n) in enumerate(plan) if n == 1]
        if decode:
            reqs = [plan[i][0] for i in decode]
            # a request with drafted tokens has a row for each (speculate.py), on its own blocks
            ids, positions, tables, seqs, first = [], [], [], [], []
            for r in reqs:
                first.append(len(ids))
                for j, token in enumerate(r.span(r.num_computed, r.num_computed + 1) + r.draft):
                    ids.append([token])
                    positions.append([r.num_computed + j])
                    tables.append(r.blocks)
                    seqs.append(r.id)
            logits = self.program.run(StepBatch("decode", ids, positions, _tables(tables), seqs), k, v)
            for row, i, r in zip(first, decode, reqs):
                out[i] = logits[row:row + 1 + len(r.draft)] if r.draft else logits[row]
                if r.scoring_prompt:                  # a one-token chunk of a prompt being scored
                    self._score_prompt(r, r.num_computed, logits[row:row + 1])
        for i, (req, n) in enumerate(plan):
            if n > 1:
                start = req.num_computed
                scoring = req.scoring_prompt
                batch = StepBatch("prefill", [req.span(start, start + n)], [list(range(start, start + n))],
                                  _tables([req.blocks]), [req.id], logits="all" if scoring else "last")
                rows = self.program.run(batch, k, v)[0]
                if scoring:
                    self._score_prompt(req, start, rows)
                out[i] = rows[-1] if scoring else rows
        return out

    def _score_prompt(self, req: Request, start: int, rows: np.ndarray) -> None:
        """Record prompt logprobs from the logits of positions start.. (row j predicts token
        start + j + 1).  Positions already scored (before a preemption) are skipped."""
        prompt = req.prompt_ids
        for j in range(len(rows)):
            pos = start + j + 1
            if pos == len(req.prompt_lps) and pos < len(prompt):
                req.prompt_lps.append(token_logprob(rows[j], prompt[pos], req.prompt_logprobs))

    def _register_full_blocks(self, req: Request) -> None:
        bs = self.blocks.block_size
        full = req.num_computed // bs
        if len(req.keys) >= full:
            return
        tokens = req.tokens
        prev = req.keys[-1] if req.keys else b""
        for i in range(len(req.keys), full):
            prev = block_key(prev, tokens[i * bs:(i + 1) * bs])
            req.keys.append(prev)
            self.blocks.register(req.blocks[i], prev)

    def _sample(self, req: Request, logits: np.ndarray) -> Event:
        """Choose the next token and append it.  A drafted row is sampled exactly so too, and the
        caller keeps the draft only where the token equals it (speculate.py: the rejection rule's
        distribution, and plain decoding's tokens for the same seed)."""
        history = req.tokens if req.params.repetition_penalty != 1.0 else ()   # only the penalty reads it
        token = req.sampler(logits, history)
        req.output_ids.append(token)
        lp = None if req.logprobs is None else token_logprob(logits, token, req.logprobs)
        self.stats.generated_tokens += 1
        if req.stats.first_token is None:
            req.stats.first_token = time.perf_counter()
        reason, flush = None, True
        if token in req.stop_ids:
            reason = "stop"
        elif req.decoder is not None:
            req.text += req.decoder.push(token)
            if self._cut_at_stop_string(req):
                reason, flush = "stop", False          # the text ends before the stop string
        if reason is None and (len(req.output_ids) >= req.max_tokens
                               or (self.context and req.num_tokens >= self.context)):
            reason = "length"
        if reason is None:
            return Event(req.id, token, self._emit(req), logprob=lp)
        self.running.remove(req)
        ev = self._finish(req, reason, token, flush)
        ev.logprob = lp
        return ev

    def _cut_at_stop_string(self, req: Request) -> bool:
        """If a stop string has appeared, cut the text before it."""
        if not req.stop_strings:
            return False
        longest = max(map(len, req.stop_strings))
        start = max(0, req.emitted - longest)
        found = [i for i in (req.text.find(s, start) for s in req.stop_strings) if i >= 0]
        if not found:
            return False
        req.text = req.text[:min(found)]
        return True

    def _emit(self, req: Request, final: bool = False) -> str:
        """The text not handed out yet, minus what could still begin a stop string."""
        hold = 0 if final or not req.stop_strings else max(map(len, req.stop_strings)) - 1
        upto = max(req.emitted, len(req.text) - hold)
        piece, req.emitted = req.text[req.emitted:upto], upto
        return piece

    def _finish(self, req: Request, reason: str, token: int | None = None, flush: bool = True) -> Event:
        req.status, req.finish_reason = FINISHED, reason
        req.stats.finished = time.perf_counter()
        if req.blocks:
            self.blocks.release(req.blocks)
        req.blocks, req.keys = [], []
        if req.decoder is not None and flush:
            req.text += req.decoder.flush()
            self._cut_at_stop_string(req)
        return Event(req.id, token, self._emit(req, final=True), reason)


def _tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one [rows, widest] int32 array (short rows padded with block 0, which
    their positions never reach)."""
    out = np.zeros((len(tables), max(max(map(len, tables)), 1)), np.int32)
    for r, t in enumerate(tables):
        out[r, :len(t)] = t
    return out

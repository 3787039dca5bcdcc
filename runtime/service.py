"""The engine behind a server: one thread owns the scheduler and runs its steps; callers on any
thread (the HTTP handlers' event loop) submit requests and read their events.

The scheduler is not thread-safe and need not be: every add and abort is handed to the engine
thread as a command and carried out between steps.  Events go back through a per-request
queue (an asyncio.Queue fed with call_soon_threadsafe when the caller is a coroutine).  The
engine thread sleeps on a condition when there is nothing to do (no spinning: on two cores a
busy-waiting server thread would take a CPU from the kernels), and a bounded waiting queue
turns overload into an immediate refusal (the server's 429) instead of unbounded latency.

The engine thread is the only thread that runs the native program, its warm-up included:
each thread that opens OpenMP parallel regions gets a team of its own, and once libgomp
manages more threads than there are CPUs it stops spinning between regions (GOMP's throttled
spin count), which made every decode step 4x slower on two cores (7 -> 29 ms, SmolLM2 NF4)
when the main thread had warmed the engine up.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from .errors import RequestError
from .metrics import ServerMetrics
from .sampling import SamplingParams
from .scheduler import Event, Request

log = logging.getLogger("amxc.serve")


class QueueFull(RuntimeError):
    """More requests are waiting than the service accepts (max_queue)."""


class ServiceClosed(RuntimeError):
    """The service is shutting down and takes no new requests."""


@dataclass
class Submission:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    name: str = ""                        # the id clients see (logs)


@dataclass
class Ticket:
    """A submitted request: its id (once the engine thread accepted it) and its event stream.
    `prompt_logprobs`: [] while a request that asked for them is being scored; the engine thread
    fills it in before delivering the request's first event."""
    loop: asyncio.AbstractEventLoop
    name: str = ""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: int | None = None
    prompt_logprobs: list | None = None
    last_token: float | None = None       # when its previous token came (inter-token latency)


class EngineService:
    def __init__(self, engine, *, max_queue: int = 256, warm_up: bool = False):
        """`warm_up`: run Engine.warm_up on the engine thread before the first request;
        `ready` is set when the thread serves."""
        self.engine, self.scheduler, self.max_queue = engine, engine.scheduler, max_queue
        self.warm_up, self.ready = warm_up, threading.Event()
        self._cv = threading.Condition()
        self._commands: deque = deque()
        self._tickets: dict[int, Ticket] = {}
        self._closing = False
        self.metrics = ServerMetrics(self.scheduler)
        self._thread = threading.Thread(target=self._loop, name="amxc-engine", daemon=True)
        self._thread.start()

    # -- callers ---------------------------------------------------------------------------------
    async def submit(self, sub: Submission) -> Ticket:
        """Queue a request; its events (scheduler.Event, or an exception) arrive on ticket.queue.
        Raises QueueFull or ServiceClosed at once, RequestError when the engine refuses it."""
        ticket = Ticket(asyncio.get_running_loop(), sub.name,
                        prompt_logprobs=[] if sub.prompt_logprobs is not None else None)
        accepted = ticket.loop.create_future()
        with self._cv:
            if self._closing:
                self.metrics.rejected.labels("closing").inc()
                raise ServiceClosed("the server is shutting down")
            if len(self.scheduler.waiting) + len(self._commands) >= self.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._commands.append(("add", sub, ticket, accepted))
            self._cv.notify()
        await accepted                      # the id, or the RequestError from add_request
        return ticket

    def abort(self, ticket: Ticket) -> None:
        """Stop a request (a client went away): its blocks are freed at the next step."""
        with self._cv:
            self._commands.append(("abort", ticket))
            self._cv.notify()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with `drain`, finish the running and waiting ones first."""
        with self._cv:
            self._closing = True
            if not drain:
                self._commands.append(("abort_all",))
            self._cv.notify()
        self._thread.join(timeout)

    @property
    def stats(self) -> dict:
        s, b = self.scheduler, self.scheduler.blocks
        return {"running": len(s.running), "waiting": len(s.waiting), "kv_usage": b.usage,
                "prefix_hit_rate": b.stats.hit_rate, "preemptions": s.stats.preemptions,
                "prompt_tokens": s.stats.prompt_tokens, "generated_tokens": s.stats.generated_tokens}

    # -- the engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            if self.warm_up:
                self.engine.warm_up()
        finally:
            self.ready.set()
        while True:
            with self._cv:
                while not self._commands and not self.scheduler.has_work and not self._closing:
                    self._cv.wait()
                commands, self._commands = list(self._commands), deque()
                if self._closing and not commands and not self.scheduler.has_work:
                    return
            for cmd in commands:
                self._apply(cmd)
            if not self.scheduler.has_work:
                continue
            try:
                events = self.scheduler.step()
            except Exception as e:                      # a step failed: fail its requests, keep serving
                for rid, ticket in list(self._tickets.items()):
                    self.scheduler.abort(rid)
                    self._deliver(ticket, e)
                    self._forget(rid)
                continue
            now = time.perf_counter()
            for ev in events:
                ticket = self._tickets.get(ev.request_id)
                if ticket is None:
                    continue
                if ev.token is not None:
                    if ticket.last_token is not None:
                        self.metrics.itl.observe(now - ticket.last_token)
                    ticket.last_token = now
                self._deliver(ticket, ev)
                if ev.finish_reason is not None:
                    self._forget(ev.request_id)

    def _apply(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, sub, ticket, accepted = cmd
            try:
                rid = self.scheduler.add_request(sub.prompt_ids, sub.params, max_tokens=sub.max_tokens,
                                                 stop_ids=sub.stop_ids, stop_strings=sub.stop_strings,
                                                 logprobs=sub.logprobs, prompt_logprobs=sub.prompt_logprobs)
            except RequestError as e:
                self.metrics.rejected.labels("invalid").inc()
                ticket.loop.call_soon_threadsafe(_settle, accepted, None, e)
                return
            ticket.id = rid
            self._tickets[rid] = ticket
            ticket.loop.call_soon_threadsafe(_settle, accepted, rid, None)
            req = self.scheduler.requests[rid]
            if req.finished:                              # max_tokens 0
                self._deliver(ticket, Event(rid, None, "", req.finish_reason))
                self._forget(rid)
        elif kind == "abort":
            ticket = cmd[1]
            if ticket.id is not None and ticket.id in self._tickets:
                self.scheduler.abort(ticket.id)
                self._forget(ticket.id)
        elif kind == "abort_all":
            for rid in list(self._tickets):
                self.scheduler.abort(rid)
                self._deliver(self._tickets[rid], Event(rid, None, "", "abort"))
                self._forget(rid)

    def _deliver(self, ticket: Ticket, item) -> None:
        if ticket.prompt_logprobs == [] and ticket.id in self.scheduler.requests:
            ticket.prompt_logprobs = list(self.scheduler.requests[ticket.id].prompt_lps)
        ticket.loop.call_soon_threadsafe(ticket.queue.put_nowait, item)

    def _forget(self, rid: int) -> None:
        ticket = self._tickets.pop(rid, None)
        req = self.scheduler.release(rid)
        if req is not None and req.finished:
            self._account(req, ticket.name if ticket is not None else str(rid))

    def _account(self, req: Request, name: str) -> None:
        """Metrics and the one log line of a finished request."""
        st, n = req.stats, len(req.output_ids)
        self.metrics.finished.labels(req.finish_reason).inc()
        if st.ttft is not None:
            self.metrics.ttft.observe(st.ttft)
        if st.finished is not None:
            self.metrics.e2e.observe(st.finished - st.arrival)
        decode_s = (st.finished - st.first_token) if st.first_token is not None and st.finished else 0.0
        rate = f"{(n - 1) / decode_s:.1f} tok/s" if n > 1 and decode_s > 0 else "-"
        ttft = f"{st.ttft * 1e3:.0f} ms" if st.ttft is not None else "-"
        log.info("%s: prompt %d tokens (%d cached), generated %d, ttft %s, %s, finish %s%s", name,
                 len(req.prompt_ids), st.cached_tokens, n, ttft, rate, req.finish_reason,
                 f", preempted {st.preemptions}x" if st.preemptions else "")


def _settle(future: asyncio.Future, value, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def request_of(engine, prompt, *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: Sequence[str] | None = None,
               add_special_tokens: bool = True, ignore_eos: bool = False, logprobs: int | None = None,
               prompt_logprobs: int | None = None, name: str = "") -> Submission:
    """A Submission from request fields, checked the way Engine.generate checks them."""
    params = SamplingParams(temperature, top_k, top_p, 1.0, seed)
    ids = engine._prompts([prompt], add_special_tokens, max_tokens, False)[0]
    stop_ids, stop_strings = engine._stops(list(stop or ()), ignore_eos)
    return Submission(ids, params, max_tokens, frozenset(stop_ids), tuple(stop_strings), logprobs,
                      prompt_logprobs, name)

"""The inference engine: requests through the step scheduler over a paged, prefix-cached KV cache.

`generate`, `stream` and `chat` queue their prompts on the engine's scheduler (scheduler.py) and
step it until they are done: prompts are prefilled in chunks, decoded together, and any other
request on the same engine (the server's) shares those steps.  Execution goes through a program
from amxc.backends (native kernels for the machine's best ISA tier, or the reference
interpreter), chosen by the engine's Settings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from amxc.backends.program import Program, ProgramError, build_program
from amxc.backends.step import StepBatch
from amxc.backends.toolchain import BuildError
from amxc.ir import Module

from .artifact import ArtifactError, load_artifact, read_manifest
from .blocks import BlockStats, KVCacheError
from .errors import RequestError
from .kv_cache import KVStorage
from .sampling import SamplingParams
from .scheduler import Event, Request, Scheduler, SchedulerStats
from .settings import Settings
from .speculate import DraftModel


@dataclass
class Timings:
    """Where the time of one generate() call went (seconds).  A step that prefills counts as
    prefill (with any decode rows that shared it); a step of decode rows only, as decode."""
    prefill: float = 0.0
    prefill_tokens: int = 0
    decode: list[float] = field(default_factory=list)    # one entry per decode step, sampling included
    decode_tokens: int = 0
    sampling: float = 0.0               # of all steps, the part after the native call (sampling)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / sum(self.decode) if self.decode else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill if self.prefill else 0.0

    def summary(self) -> str:
        per = 1000 * sum(self.decode) / max(len(self.decode), 1)
        return (f"prefill {self.prefill_tokens} tokens in {self.prefill * 1000:.0f} ms "
                f"({self.prefill_tokens_per_s:.1f} tok/s); decode {self.decode_tokens} tokens in "
                f"{len(self.decode)} steps, {per:.1f} ms/step ({self.decode_tokens_per_s:.1f} tok/s)")


@dataclass
class Generation:
    """One sequence's result."""
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)       # generated tokens (stop token included)
    text: str = ""
    finish_reason: str | None = None                   # "stop", "length" or "kv_full"
    cached_tokens: int = 0                             # prompt tokens the prefix cache supplied
    preemptions: int = 0
    ttft: float | None = None                          # seconds from queueing to the first token
    drafted_tokens: int = 0                            # speculative decoding: tokens drafted ...
    accepted_tokens: int = 0                           # ... and taken

    @property
    def acceptance(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None


@dataclass
class StreamEvent:
    index: int          # which prompt of the batch
    token: int | None   # None: the sequence ended without a new token (finish_reason "kv_full")
    text: str           # the new text this token completes (may be empty mid-character)
    finish_reason: str | None = None


def default_program(module: Module, settings: Settings, artifact: str | Path | None = None) -> Program:
    """The program the settings ask for.  Native kernels that cannot be built (no g++, a
    compiler error) are a BuildError saying so, never a silent switch to the interpreter.  A
    module sharded for tensor parallelism runs natively as one process per rank, started from
    its artifact (runtime/ranks.py); the interpreter runs its ranks in lockstep in-process."""
    ways = module.attrs.get("tp", 1)
    try:
        if ways > 1 and settings.native.executor == "native" and settings.native.tier != "interpreter":
            if artifact is None:
                raise ArtifactError(f"@{module.name} is sharded {ways} ways: its ranks start from its "
                                    f"artifact (Engine.load(ART), amxc run ART)")
            from .ranks import RankedProgram, mpi_program
            if settings.transport == "mpi":
                return mpi_program(module, settings)
            return RankedProgram(module, artifact, settings)
        return build_program(module, settings.native)
    except BuildError as e:
        raise BuildError(f"native kernels could not be built: {e}\nset AMXC_EXECUTOR=interpreter to run "
                         f"on the reference interpreter") from e
    except ProgramError as e:
        raise ArtifactError(str(e)) from None


class Engine:
    """An artifact's model behind a step scheduler.  `settings` (default: Settings.from_env(),
    with `kv_tokens`, `block_size`, `isa`, ... as overrides) fixes the cache and the program;
    `program` replaces the program (tests: the interpreter, a native one with chosen options)."""

    def __init__(self, module: Module, manifest: dict | None = None, tokenizer=None, *,
                 settings: Settings | None = None, program: Program | None = None,
                 artifact: str | Path | None = None, **overrides):
        for fn in ("prefill", "decode"):
            if fn not in module.functions:
                raise ArtifactError(f"module @{module.name} has no @{fn}: compile it with the kv-cache pass")
        self.settings = (settings or Settings.from_env()).with_overrides(**overrides)
        cache_type = module.functions["prefill"].args[-1].type
        if self.settings.kv_bytes is not None:
            self.settings = _kv_tokens_for(self.settings, cache_type)
        self.module, self.manifest, self.tokenizer = module, manifest or {}, tokenizer
        self.program = program if program is not None else default_program(module, self.settings, artifact)
        self.config = self.manifest.get("config", dict(module.attrs))
        self.context = _context_length(self.config)
        self.draft = self._draft_model(artifact)
        self.scheduler = Scheduler(self.program, cache_type, self.settings,
                                   tokenizer=tokenizer, context=self.context, draft_model=self.draft)
        self.last_timings = Timings()

    @classmethod
    def load(cls, path: str | Path, *, kv_storage: str | None = None, **kwargs) -> "Engine":
        """An artifact directory (verified, weights memory-mapped) and its tokenizer.
        `kv_storage` ("f32" | "f16" | "i8") overrides how the KV cache stores keys and values (a run
        option: the cache's type changes, the weights do not; single-process artifacts)."""
        from .tokenizer import Tokenizer
        module, manifest = load_artifact(path)
        if kv_storage is not None:
            with_kv_storage(module, kv_storage)
        tok_dir = Path(path) / "tokenizer"
        tokenizer = Tokenizer.from_dir(tok_dir) if (tok_dir / "tokenizer.json").exists() else None
        return cls(module, manifest, tokenizer, artifact=path, **kwargs)

    def close(self) -> None:
        """Stop what the program started (a sharded artifact's rank processes); idempotent."""
        close = getattr(self.program, "close", None)
        if close is not None:
            close()
        if getattr(self, "draft", None) is not None:
            self.draft.close()

    def _draft_model(self, artifact) -> DraftModel | None:
        """--speculate draft:ART: the draft artifact's engine (this engine's native options and
        cache size, no speculation of its own), checked to share this model's tokenizer before
        anything is built."""
        spec = self.settings.speculation
        if spec is None or spec.draft is None:
            return None
        config = read_manifest(spec.draft).get("config")     # checked before anything is built

        def tokenizer_json(art):
            f = Path(art) / "tokenizer" / "tokenizer.json" if art is not None else None
            return f if f is not None and f.is_file() else None
        theirs = config.get("vocab_size") if isinstance(config, dict) else None
        try:
            DraftModel.check_compatible(spec.draft, (theirs if isinstance(theirs, int) else None,
                                                     self.config.get("vocab_size")),
                                        (tokenizer_json(spec.draft), tokenizer_json(artifact)))
        except ValueError as e:
            raise ArtifactError(str(e)) from None
        # 2-token KV blocks: the draft's prefix cache then holds all but at most one of the
        # tokens it computed, so a call prefills only what was accepted since the last one
        # (at 16, a 5-20 token tail each call: 15-47 ms against 6.5 per decode step, SmolLM2 NF4)
        draft = DraftModel(Engine.load(spec.draft, settings=replace(self.settings, speculate=None, block_size=2)),
                           spec.draft)
        return draft

    @property
    def blocks(self):
        return self.scheduler.blocks

    def warm_up(self, tokens: int = 32) -> float:
        """Run one short prompt and two decode steps, then forget them (cache and counters), so
        that a server's first request does not pay for first-touch costs (weight pages, thread
        start-up: ~0.3 s for SmolLM2).  Returns the seconds it took."""
        t0 = time.perf_counter()
        vocab = getattr(self.program, "embed_rows", 0) or 2
        ids = [i % vocab for i in range(1, tokens + 1)]
        self.generate(ids, max_new_tokens=2, ignore_eos=True)
        self.reset_prefix_cache()
        self.scheduler.stats = SchedulerStats()
        self.scheduler.blocks.stats = BlockStats()
        return time.perf_counter() - t0

    def reset_prefix_cache(self) -> None:
        """Forget the cached prompt blocks no request holds (benchmarks: a cold prefill)."""
        self.scheduler.blocks.reset_prefix_cache()

    # -- public API --------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: Sequence[int | str] | None = None, add_special_tokens: bool = True,
                 truncate: bool = False, ignore_eos: bool = False):
        """Generate for one prompt (text or token ids) or a list of them; returns a Generation
        or a list.  Greedy unless temperature > 0 (prompt i of a list samples with seed + i).
        A prompt longer than the model's context is an error, or, with `truncate`, keeps its
        last tokens (leaving room to generate).  Generation ends at a stop token or stop string
        ("stop": a stop string is cut from the text), after max_new_tokens or at the context's
        end ("length"), or when the KV cache cannot hold the sequence even alone ("kv_full":
        what was generated is kept).  `ignore_eos` keeps going past the model's end-of-sequence
        tokens (benchmarks: every run takes exactly max_new_tokens steps); `stop` still stops."""
        events = self.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                             add_special_tokens=add_special_tokens, truncate=truncate, ignore_eos=ignore_eos)
        for _ in events:
            pass
        results = self._results
        return results if self._is_batch(prompt) else results[0]

    def stream(self, prompt, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: Sequence[int | str] | None = None, add_special_tokens: bool = True,
               truncate: bool = False, ignore_eos: bool = False) -> Iterator[StreamEvent]:
        """Like generate(), yielding each token as it is produced, with the text it completes."""
        batch = self._as_batch(prompt)
        prompts = self._prompts(batch, add_special_tokens, max_new_tokens, truncate)
        stop_ids, stop_strings = self._stops(stop, ignore_eos)
        ids = []
        try:
            for i, p in enumerate(prompts):
                params = SamplingParams(temperature, top_k, top_p, repetition_penalty,
                                        None if seed is None else seed + i)
                ids.append(self.scheduler.add_request(p, params, max_tokens=max_new_tokens, stop_ids=stop_ids,
                                                      stop_strings=stop_strings))
        except RequestError as e:
            for rid in ids:
                self.scheduler.abort(rid)
                self.scheduler.release(rid)
            raise RequestError(f"{e}" + (f" (prompt {len(ids)})" if len(prompts) > 1 else "")) from None
        index = {rid: i for i, rid in enumerate(ids)}
        reqs = [self.scheduler.requests[rid] for rid in ids]
        timings = self.last_timings = Timings()
        pending = [Event(r.id, None, "", r.finish_reason) for r in reqs if r.finished]   # max_new_tokens 0
        try:
            while True:
                for ev in pending:
                    if ev.request_id in index:
                        yield StreamEvent(index[ev.request_id], ev.token, ev.text, ev.finish_reason)
                if all(r.finished for r in reqs):
                    break
                pending = self.scheduler.step()
                self._account(timings)
        finally:
            for rid in ids:
                self.scheduler.abort(rid)          # no-op for finished ones; frees a dropped stream's blocks
            self._results = [self._generation(self.scheduler.release(rid)) for rid in ids]

    def chat(self, messages: list[dict], **kwargs) -> Generation:
        return self.generate(self.chat_prompt(messages), add_special_tokens=False, **kwargs)

    def chat_prompt(self, messages: list[dict]) -> str:
        if self.tokenizer is None or not self.tokenizer.has_chat_template:
            raise RequestError("this model has no chat template: use plain completion (no --chat)")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] logits of one prefill of `ids` from an empty cache (scoring)."""
        blocks = self.blocks
        need = blocks.blocks_for(len(ids))
        if not blocks.can_allocate(need):
            raise KVCacheError(f"scoring {len(ids)} tokens needs {need} KV blocks of {blocks.block_size}; "
                               f"{blocks.num_free} of {blocks.num_blocks} are free")
        table = blocks.allocate(need)
        try:
            batch = StepBatch("prefill", [list(ids)], [list(range(len(ids)))], [table], [-1], logits="all")
            return self.program.run(batch, self.scheduler.storage.k, self.scheduler.storage.v)[0]
        finally:
            blocks.release(table)

    def perplexity(self, text: str, *, window: int | None = None, stride: int | None = None,
                   max_tokens: int | None = None, progress: bool = False):
        """Sliding-window perplexity of `text` (see runtime/perplexity.py).  Default window:
        the model's context, at most 512; default stride: half the window."""
        from .perplexity import perplexity
        if self.tokenizer is None:
            raise RequestError("this artifact has no tokenizer: perplexity needs one")
        ids = self.tokenizer.encode(text, add_special_tokens=True)[:max_tokens]
        window = window or min(int(self.config.get("max_position_embeddings", 512)), 512)
        return perplexity(self.logits, ids, window, stride or window // 2, progress)

    # -- bookkeeping -------------------------------------------------------------------------------
    def _account(self, timings: Timings) -> None:
        step = self.scheduler.last_step
        if step is None:
            return
        timings.sampling += step.after_call
        if step.prefill_tokens:
            timings.prefill += step.seconds
            timings.prefill_tokens += step.prefill_tokens
        else:
            timings.decode.append(step.seconds)
            timings.decode_tokens += step.decoded_tokens
        self.scheduler.last_step = None

    @staticmethod
    def _generation(req: Request) -> Generation:
        return Generation(req.prompt_ids, list(req.output_ids), req.text, req.finish_reason,
                          req.stats.cached_tokens, req.stats.preemptions, req.stats.ttft,
                          req.stats.drafted_tokens, req.stats.accepted_tokens)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _is_batch(prompt) -> bool:
        return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)

    def _as_batch(self, prompt) -> list:
        return prompt if self._is_batch(prompt) else [prompt]

    def _prompts(self, batch, add_special_tokens: bool, max_new_tokens, truncate: bool) -> list[list[int]]:
        """Token ids of each prompt, checked against the context (or cut to fit, if asked)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise RequestError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        out = []
        for index, p in enumerate(batch):
            ids = self._encode(p, add_special_tokens)
            if not ids:
                raise RequestError("empty prompt" + (f" (prompt {index})" if len(batch) > 1 else ""))
            if self.context and len(ids) >= self.context:
                if not truncate:
                    raise RequestError(
                        f"the prompt is {len(ids)} tokens and the model's context is {self.context} "
                        f"(max_position_embeddings), leaving no room to generate; shorten it or "
                        f"truncate it (--truncate keeps its last tokens)")
                ids = ids[-max(self.context - max_new_tokens, self.context // 2, 1):]
            out.append(ids)
        return out

    def _encode(self, prompt, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this artifact has no tokenizer: pass token ids")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:          # lone surrogates: bytes that were not UTF-8
                raise RequestError(f"the prompt is not valid UTF-8 text (character {e.start})") from None
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        try:
            return [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise RequestError("a prompt is text or a list of token ids") from None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _stops(self, stop, ignore_eos: bool = False) -> tuple[set[int], list[str]]:
        """Stop token ids (the model's end-of-sequence tokens unless ignore_eos, and any ids in
        `stop`) and stop strings (matched on the generated text)."""
        ids = set(self.tokenizer.eos_token_ids) if self.tokenizer is not None else set()
        eos = self.config.get("eos_token_id")
        ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        if ignore_eos:
            ids = set()
        strings = []
        for s in stop or ():
            if isinstance(s, bool) or not isinstance(s, (int, str)):
                raise RequestError(f"a stop entry is a token id or a string, got {type(s).__name__}")
            if isinstance(s, int):
                ids.add(s)
            elif s:
                strings.append(s)
        return ids, strings


def _kv_tokens_for(settings: Settings, cache_type) -> Settings:
    """Settings whose kv_tokens fill settings.kv_bytes of KV cache (whole blocks)."""
    per_token = KVStorage.bytes_per_token(cache_type)
    blocks = settings.kv_bytes // (per_token * settings.block_size)
    if blocks < 1:
        raise KVCacheError(f"a KV cache of {settings.kv_bytes} bytes holds less than one block of "
                           f"{settings.block_size} tokens ({per_token} bytes per token, {cache_type}); allow more")
    return replace(settings, kv_tokens=blocks * settings.block_size, kv_bytes=None)


def _context_length(config: dict) -> int | None:
    """The model's context (max_position_embeddings) from the artifact's config, if it says."""
    value = config.get("max_position_embeddings")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArtifactError(f"config: max_position_embeddings must be a positive integer, got {value!r}")
    return value


def with_kv_storage(module, storage: str) -> None:
    """Make the module's KV cache store `storage` ("f32", "f16" or "i8"), in place: the one cache
    argument of @prefill and @decode (the attention ops read its type from there)."""
    from dataclasses import replace

    if module.attrs.get("tp", 1) > 1:
        raise RequestError("a sharded artifact's ranks load their own modules: choose the KV storage "
                           "at compile time (amxc compile --kv)")
    for name in ("prefill", "decode"):
        cache = module.functions[name].args[-1]
        try:
            cache.type = replace(cache.type, storage=storage)
        except ValueError as e:
            raise RequestError(f"{e} ({cache.type})") from None

"""The inference engine: prefill a prompt, then decode token by token through a paged KV cache.

Sequences are prefilled one at a time (each its own length) and decoded together, one token per
sequence per step, so a batch of prompts of different lengths needs no padding: row r of every
decode step is sequence r at its own position.  Execution goes through an executor: the
native kernels for the machine's best ISA tier (amxc.backends), or the reference interpreter.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from amxc.ir import Module
from amxc.ir.interpreter import run as interpret

from .artifact import ArtifactError, load_artifact
from .errors import RequestError
from .kv_cache import KVCacheError, PagedKVCache
from .sampling import Sampler, SamplingParams


@dataclass
class Timings:
    """Where the time of one generate() call went (seconds)."""
    prefill: float = 0.0
    prefill_tokens: int = 0
    decode: list[float] = field(default_factory=list)    # one entry per decode step
    sampling: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / sum(self.decode) if self.decode else 0.0

    decode_tokens: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill if self.prefill else 0.0

    def summary(self) -> str:
        per = 1000 * sum(self.decode) / max(len(self.decode), 1)
        return (f"prefill {self.prefill_tokens} tokens in {self.prefill * 1000:.0f} ms "
                f"({self.prefill_tokens_per_s:.1f} tok/s); decode {self.decode_tokens} tokens in "
                f"{len(self.decode)} steps, {per:.1f} ms/step ({self.decode_tokens_per_s:.1f} tok/s); "
                f"sampling {self.sampling * 1000:.1f} ms")


@dataclass
class Generation:
    """One sequence's result."""
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)       # generated tokens (stop token included)
    text: str = ""
    finish_reason: str | None = None                   # "stop", "length" or "kv_full"


@dataclass
class StreamEvent:
    index: int          # which prompt of the batch
    token: int | None   # None: the sequence ended without a new token (finish_reason "kv_full")
    text: str           # the new text this token completes (may be empty mid-character)
    finish_reason: str | None = None


Executor = Callable[[Module, str, list], np.ndarray]


def interpreter_executor(module: Module, function: str, inputs: list) -> np.ndarray:
    return interpret(module, inputs, function=function)[0]


interpreter_executor.__name__ = "interpreter"


def default_executor(module: Module, isa: str | None = None) -> Executor:
    """Native kernels for this machine's best ISA tier (AMXC_ISA or `isa` may ask for a lower
    one).  The reference interpreter only when asked for: AMXC_EXECUTOR=interpreter (or
    isa="interpreter").  Native kernels that cannot be built (no g++, a compiler error) are a
    BuildError saying so, never a silent switch to the interpreter.  A module compiled without
    the lower pass is lowered here, in memory."""
    from amxc.backends import env
    if env.choice("AMXC_EXECUTOR") == "interpreter" or isa == "interpreter":
        return interpreter_executor
    from amxc.backends.executor import NativeExecutor
    from amxc.backends.toolchain import BuildError

    if "target" not in module.attrs:
        from amxc.backends.lower import Lower
        Lower().run(module)
    try:
        return NativeExecutor(module, isa)
    except BuildError as e:
        raise BuildError(f"native kernels could not be built: {e}\nset AMXC_EXECUTOR=interpreter to run "
                         f"on the reference interpreter") from e


class Engine:
    def __init__(self, module: Module, manifest: dict | None = None, tokenizer=None, *,
                 kv_tokens: int = 4096, block_size: int = 16, executor: Executor | None = None,
                 isa: str | None = None):
        for fn in ("prefill", "decode"):
            if fn not in module.functions:
                raise ArtifactError(f"module @{module.name} has no @{fn}: compile it with the kv-cache pass")
        if executor is None:
            executor = default_executor(module, isa)
        self.module, self.manifest, self.tokenizer, self.executor = module, manifest or {}, tokenizer, executor
        cache_type = module.functions["prefill"].args[-1].type
        self.cache = PagedKVCache(cache_type, num_blocks=-(-kv_tokens // block_size), block_size=block_size)
        self.config = self.manifest.get("config", dict(module.attrs))
        self.context = _context_length(self.config)
        self.last_timings = Timings()

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "Engine":
        """An artifact directory (verified, weights memory-mapped) and its tokenizer."""
        from .tokenizer import Tokenizer
        module, manifest = load_artifact(path)
        tok_dir = Path(path) / "tokenizer"
        tokenizer = Tokenizer.from_dir(tok_dir) if (tok_dir / "tokenizer.json").exists() else None
        return cls(module, manifest, tokenizer, **kwargs)

    # -- public API --------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: Sequence[int | str] | None = None, add_special_tokens: bool = True,
                 truncate: bool = False, ignore_eos: bool = False):
        """Generate for one prompt (text or token ids) or a list of them; returns a Generation
        or a list.  Greedy unless temperature > 0.  A prompt longer than the model's context is
        an error, or, with `truncate`, keeps its last tokens (leaving room to generate).
        Generation ends at a stop token ("stop"), after max_new_tokens or at the context's end
        ("length"), or when the KV cache has no room left ("kv_full": what was generated is kept).
        `ignore_eos` keeps going past the model's end-of-sequence tokens (for benchmarks: every
        run then takes exactly max_new_tokens steps); `stop` entries still stop."""
        batch = self._as_batch(prompt)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        results = [Generation(ids) for ids in self._prompts(batch, add_special_tokens, max_new_tokens, truncate)]
        for _ in self._run(results, max_new_tokens, params, stop, ignore_eos):
            pass
        for r in results:
            r.text = self._decode(r.ids)
        return results if self._is_batch(prompt) else results[0]

    def stream(self, prompt, max_new_tokens: int = 64, **kwargs) -> Iterator[StreamEvent]:
        """Like generate(), yielding each token as it is produced, with its new text."""
        stop = kwargs.pop("stop", None)
        add_special = kwargs.pop("add_special_tokens", True)
        truncate = kwargs.pop("truncate", False)
        ignore_eos = kwargs.pop("ignore_eos", False)
        params = SamplingParams(**{k: kwargs.pop(k) for k in list(kwargs)
                                   if k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")})
        if kwargs:
            raise TypeError(f"unknown options: {', '.join(kwargs)}")
        batch = self._as_batch(prompt)
        results = [Generation(ids) for ids in self._prompts(batch, add_special, max_new_tokens, truncate)]
        decoders = [self.tokenizer.stream() if self.tokenizer else None for _ in results]
        for index, token, reason in self._run(results, max_new_tokens, params, stop, ignore_eos):
            d = decoders[index]
            text = d.push(token) if d is not None and token is not None and reason != "stop" else ""
            yield StreamEvent(index, token, text, reason)
        for r in results:
            r.text = self._decode(r.ids)

    def chat(self, messages: list[dict], **kwargs) -> Generation:
        return self.generate(self.chat_prompt(messages), add_special_tokens=False, **kwargs)

    def chat_prompt(self, messages: list[dict]) -> str:
        if self.tokenizer is None or not self.tokenizer.has_chat_template:
            raise RequestError("this model has no chat template: use plain completion (no --chat)")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] logits of one prefill of `ids` from an empty cache (scoring)."""
        seq = -1                                  # never a generate() sequence id
        self.cache.reserve(seq, len(ids))
        try:
            out = self._step("prefill", [seq], np.asarray([ids], dtype=np.int64),
                             np.arange(len(ids), dtype=np.int64)[None])
        finally:
            self.cache.free(seq)
        return out[0]

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

    # -- the loop ------------------------------------------------------------------------------
    def _run(self, results: list[Generation], max_new_tokens: int, params: SamplingParams, stop,
             ignore_eos: bool = False):
        stop_ids = self._stop_ids(stop, ignore_eos)
        samplers = [Sampler(params if params.seed is None else
                            SamplingParams(**{**params.__dict__, "seed": params.seed + i}))
                    for i in range(len(results))]
        timings = self.last_timings = Timings()
        seqs = list(range(len(results)))
        active: list[int] = []
        try:
            for i, r in enumerate(results):            # prefill each sequence at its own length
                if max_new_tokens < 1:
                    r.finish_reason = "length"
                    continue
                n = len(r.prompt_ids)
                try:
                    self.cache.reserve(seqs[i], n)
                except KVCacheError:
                    free = len(self.cache.free_blocks) * self.cache.block_size
                    raise KVCacheError(
                        f"the prompt{f' {i}' if len(results) > 1 else ''} is {n} tokens and the KV cache has "
                        f"room for {free} more (of {self.cache.capacity_tokens}); allow more KV tokens "
                        f"(--kv-tokens) or send fewer/shorter prompts") from None
                t0 = time.perf_counter()
                logits = self._step("prefill", [seqs[i]], np.asarray([r.prompt_ids], dtype=np.int64),
                                    np.arange(n, dtype=np.int64)[None])
                timings.prefill += time.perf_counter() - t0
                timings.prefill_tokens += n
                yield from self._take(i, r, logits[0, -1], samplers[i], stop_ids, max_new_tokens, timings)
                if r.finish_reason is None:
                    active.append(i)
            while active:                               # decode all live sequences together
                for i in list(active):
                    try:
                        self.cache.reserve(seqs[i], len(results[i].prompt_ids) + len(results[i].ids))
                    except KVCacheError:                # keep what was generated; free its blocks
                        results[i].finish_reason = "kv_full"
                        active.remove(i)
                        self.cache.free(seqs[i])
                        yield i, None, "kv_full"
                if not active:
                    break
                ids = np.asarray([[results[i].ids[-1]] for i in active], dtype=np.int64)
                pos = np.asarray([[len(results[i].prompt_ids) + len(results[i].ids) - 1] for i in active],
                                 dtype=np.int64)
                t0 = time.perf_counter()
                logits = self._step("decode", [seqs[i] for i in active], ids, pos)
                timings.decode.append(time.perf_counter() - t0)
                timings.decode_tokens += len(active)
                for row, i in enumerate(active):
                    yield from self._take(i, results[i], logits[row, -1], samplers[i], stop_ids,
                                          max_new_tokens, timings)
                active = [i for i in active if results[i].finish_reason is None]
        finally:
            for s in seqs:
                self.cache.free(s)

    def _take(self, i, r: Generation, logits, sampler, stop_ids, max_new_tokens, timings):
        t0 = time.perf_counter()
        token = sampler(logits, r.prompt_ids + r.ids)
        timings.sampling += time.perf_counter() - t0
        r.ids.append(token)
        if token in stop_ids:
            r.finish_reason = "stop"
        elif len(r.ids) >= max_new_tokens or (self.context and len(r.prompt_ids) + len(r.ids) >= self.context):
            r.finish_reason = "length"
        yield i, token, r.finish_reason

    def _step(self, function: str, seqs: list[int], ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
        return self.executor(self.module, function, [ids, pos, self.cache.view(seqs)])

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

    def _stop_ids(self, stop, ignore_eos: bool = False) -> set[int]:
        ids = set(self.tokenizer.eos_token_ids) if self.tokenizer is not None else set()
        eos = self.config.get("eos_token_id")
        ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        if ignore_eos:
            ids = set()
        for s in stop or ():
            if isinstance(s, int):
                ids.add(s)
            elif self.tokenizer is not None:
                encoded = self.tokenizer.encode(s, add_special_tokens=False)
                if len(encoded) != 1:
                    raise RequestError(f"stop string {s!r} is not a single token")
                ids.add(encoded[0])
        return ids


def _context_length(config: dict) -> int | None:
    """The model's context (max_position_embeddings) from the artifact's config, if it says."""
    value = config.get("max_position_embeddings")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArtifactError(f"config: max_position_embeddings must be a positive integer, got {value!r}")
    return value

"""`amxc eval --compare`: several models on the same text, side by side.

Every model scores the same token ids (the first model's tokenizer: the models must share a
vocabulary, as quantized variants of one checkpoint do) in the same windows, so perplexities
differ only by the weights.  Rows also carry bytes per parameter (the whole model as stored)
and decode tok/s (greedy, one sequence, same prompt).  A `.gguf` file runs through
llama-cpp-python (optional: the anchor users already know), everything else through amxc.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Row:
    model: str
    engine: str
    bytes_per_param: float          # the whole model as stored
    bytes_per_layer_weight: float   # the matrices inside the transformer layers: the format itself
    perplexity: float
    tokens_scored: int
    decode_tok_s: float

    def to_json(self) -> dict:
        return self.__dict__.copy()


def side_by_side(models: list, text: str, *, window: int = 512, stride: int | None = None,
                 max_tokens: int | None = None, decode_tokens: int = 64, threads: int | None = None,
                 kv: str | None = None, progress: bool = False) -> list[Row]:
    """`kv` ("f32" | "f16" | "i8"): the KV storage of every amxc model (default: each artifact's own)."""
    from amxc.api import load
    from amxc.errors import UsageError
    from amxc.runtime.perplexity import perplexity

    if not models:
        raise UsageError("--compare needs at least one model")
    first = next((m for m in models if not str(m).endswith(".gguf")), None)
    if first is None:
        raise UsageError("--compare needs an amxc model or artifact first: its tokenizer scores every model")
    engine0 = load(first, kv=kv)
    if engine0.tokenizer is None:
        raise UsageError(f"{first}: no tokenizer, so no text to score")
    ids = engine0.tokenizer.encode(text, add_special_tokens=True)[:max_tokens]
    prompt = ids[:min(len(ids), 32)]
    stride = stride or window
    rows = []
    for m in models:
        t0 = time.perf_counter()
        if str(m).endswith(".gguf"):
            runner = _LlamaCpp(Path(m), window, threads)
            if runner.llm.n_vocab() != engine0.config.get("vocab_size", runner.llm.n_vocab()):
                raise UsageError(f"{m}: vocabulary {runner.llm.n_vocab()} differs from {first}'s "
                                 f"{engine0.config.get('vocab_size')}: the same token ids cannot score it")
            size, params, layer_bytes, layer_params = runner.size()
            ppl = perplexity(runner.logits, ids, window, stride, progress)
            rate = runner.decode_rate(prompt, decode_tokens)
            name, kind = Path(m).name, "llama.cpp"
        else:
            engine = engine0 if m == first else load(m, kv=kv)
            if engine.tokenizer is not None and engine.config.get("vocab_size") != engine0.config.get("vocab_size"):
                raise UsageError(f"{m}: vocabulary {engine.config.get('vocab_size')} differs from {first}'s")
            size, params, layer_bytes, layer_params = _artifact_size(engine)
            ppl = perplexity(engine.logits, ids, window, stride, progress)
            engine.generate(prompt, max_new_tokens=decode_tokens, ignore_eos=True)
            rate = engine.last_timings.decode_tokens_per_s
            name, kind = Path(str(m)).name, engine.program.name
            if engine.program.cache_type.storage != "f32":
                name += f" (KV {engine.program.cache_type.storage})"
        rows.append(Row(name, kind, size / params, layer_bytes / max(layer_params, 1), ppl.perplexity,
                        ppl.tokens_scored, round(rate, 2)))
        if progress:
            import sys
            print(f"{name}: perplexity {ppl.perplexity:.4f}, {rows[-1].bytes_per_param:.4f} B/param, "
                  f"decode {rate:.1f} tok/s ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return rows


def format_rows(rows: list[Row]) -> str:
    base = rows[0].perplexity
    out = ["| model | engine | bytes/param | bytes/layer weight | perplexity | vs first | decode tok/s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.model} | {r.engine} | {r.bytes_per_param:.4f} | {r.bytes_per_layer_weight:.4f} | "
                   f"{r.perplexity:.4f} | "
                   f"{100 * (r.perplexity / base - 1):+.2f} % | {r.decode_tok_s:.1f} |")
    return "\n".join(out)


def _artifact_size(engine) -> tuple[int, int, int, int]:
    """(bytes, parameters) of the whole model and of the 2-D weights inside its layers; parameters
    leave out pad-ffn's zero padding, which bytes include."""
    from amxc.passes.pad_ffn import true_numel
    from amxc.passes.quantize_nf4 import layer_of
    params = list(engine.module.params.values())
    layer = [p for p in params if p.type.rank == 2 and layer_of(p.name) != "other"]
    return (sum(p.type.nbytes() for p in params), sum(true_numel(p) for p in params),
            sum(p.type.nbytes() for p in layer), sum(true_numel(p) for p in layer))


class _LlamaCpp:
    """A GGUF through llama-cpp-python: logits of a window from an empty cache, decode speed."""

    def __init__(self, path: Path, window: int, threads: int | None):
        try:
            import llama_cpp
        except ImportError:
            from amxc.errors import UsageError
            raise UsageError(f"{path}: .gguf files are compared through llama-cpp-python "
                             f"(pip install llama-cpp-python)") from None
        import os
        self.path = path
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(window, 128) + 128, logits_all=True,
                                   n_threads=threads or len(os.sched_getaffinity(0)), verbose=False)

    def size(self) -> tuple[int, int, int, int]:
        from gguf import GGUFReader
        tensors = GGUFReader(str(self.path)).tensors
        layer = [t for t in tensors if t.name.startswith("blk.") and len(t.shape) == 2 and min(t.shape) > 1]
        return (sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors),
                sum(int(t.n_bytes) for t in layer), sum(int(t.n_elements) for t in layer))

    def logits(self, chunk) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(map(int, chunk)))
        return np.asarray(self.llm.scores[:len(chunk)], np.float32)

    def decode_rate(self, prompt, n: int) -> float:
        self.llm.reset()
        self.llm.eval(list(map(int, prompt)))
        t0 = time.perf_counter()
        for _ in range(n):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            self.llm.eval([token])
        return n / (time.perf_counter() - t0)

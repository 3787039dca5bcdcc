"""`amxc run`, `amxc chat` and `amxc bench`: the commands that execute a compiled model."""
from __future__ import annotations

import json
import signal
import sys
import time

import numpy as np


def add_parsers(sub) -> None:
    r = sub.add_parser("run", help="generate text from a prompt",
                       description="Load ART (or compile MODEL on first use) and continue PROMPT.")
    _model_arg(r)
    r.add_argument("-p", "--prompt", required=True, help="the prompt text")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    r.add_argument("--timing", action="store_true", help="print the prefill/decode/sampling breakdown")
    _sampling_args(r)
    _speculate_arg(r)

    c = sub.add_parser("chat", help="interactive chat using the model's chat template",
                       description="Talk to an instruct model. Commands: /reset clears the "
                                   "conversation, /exit (or end of input) quits.")
    _model_arg(c)
    c.add_argument("--system", default=None, help="a system message to start the conversation with")
    _sampling_args(c)
    _speculate_arg(c)

    e = sub.add_parser("eval", help="perplexity of a model on a text file",
                       description="Sliding-window perplexity: the text is one token stream read in "
                                   "windows of --window tokens, --stride apart; each window scores "
                                   "only the tokens the previous one did not.  Compare an fp32 and "
                                   "an NF4 artifact of the same model on the same text.")
    _model_arg(e)
    e.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    e.add_argument("--window", type=at_least(2), default=None,
                   help="tokens per window (default: the model's context, at most 512)")
    e.add_argument("--stride", type=at_least(1), default=None, help="tokens between windows (default: window/2)")
    e.add_argument("--max-tokens", type=at_least(2), default=None, help="score only the first N tokens")
    e.add_argument("--compare", nargs="+", metavar="ART|MODEL|GGUF", default=None,
                   help="score these too, side by side with ART|MODEL on the same tokens and windows "
                        "(one table: bytes/param, perplexity, decode tok/s); .gguf files run through "
                        "llama-cpp-python")
    e.add_argument("--json", action="store_true", help="print the figures as JSON")

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming)")
    _model_arg(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=at_least(1), default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ requests")
    s.add_argument("--max-queue", type=at_least(1), default=256, help="waiting requests before 429 (default 256)")
    s.add_argument("--served-model-name", default=None, help="the model id clients use (default: the model's)")
    _speculate_arg(s)

    b = sub.add_parser("bench", help="measure prefill and decode speed and peak memory")
    _model_arg(b)
    b.add_argument("--prompt-tokens", type=at_least(1), default=128)
    b.add_argument("--new-tokens", type=at_least(1), default=64)
    b.add_argument("--json", action="store_true", help="print the figures as JSON")
    b.add_argument("--cold", action="store_true",
                   help="time the process's first generation, first-touch costs included (default: "
                        "a short warm-up run first, reported as warm_up_s)")


def _model_arg(p) -> None:
    p.add_argument("model", metavar="ART|MODEL", help="an artifact, or a model compiled on first use")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-tokens", type=at_least(1), default=None, help="KV cache size in tokens (default 4096)")
    kv.add_argument("--kv-capacity", type=capacity, default=None, metavar="TOKENS|SIZE",
                    help="KV cache size as tokens (4096) or memory (512MiB, 2GiB, 1.5GB)")
    p.add_argument("--quant", metavar="SPEC", default=None,
                   help="when compiling on first use: 'nf4' (or 'nf4{double=bnb}') quantizes the weights")
    p.add_argument("--kv", choices=["f32", "f16", "i8"], default=None,
                   help="the KV cache's storage: f32; f16 (half precision: 2x the tokens in the same "
                        "memory); or i8 (int8 + a float32 scale per position and head: 3.8x the tokens at "
                        "head_dim 64); default: the artifact's")
    tp = p.add_argument_group("tensor parallelism (an artifact compiled with --tp N runs N rank processes)")
    tp.add_argument("--tp", type=at_least(1), default=None, metavar="N",
                    help="when compiling on first use: shard the model N ways")
    tp.add_argument("--transport", choices=["shm", "mpi"], default=None,
                    help="how ranks talk: shm (default: this host, ranks started here) or mpi (every "
                         "rank started by mpiexec -n N, e.g. across hosts with a hostfile)")
    tp.add_argument("--bind", default=None, metavar="CPUS|CPUS|...",
                    help="each rank's CPUs, e.g. '0-27|28-55' (default: one NUMA node per rank when the "
                         "host has as many, else the CPUs split evenly)")


def _sampling_args(p) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-new-tokens", type=at_least(0), default=128)
    g.add_argument("--truncate", action="store_true",
                   help="cut a prompt longer than the model's context to its last tokens instead of failing")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)


def _speculate_arg(p) -> None:
    p.add_argument("--speculate", type=_speculation, default=None, metavar="ngram[:K] | draft:[K:]ART",
                   help="speculative decoding: draft up to K tokens (default 6 for ngram, 4 for draft), by looking the text's "
                        "last tokens up earlier in the prompt and output (ngram) or with a smaller "
                        "compiled model of the same tokenizer (draft:ART), and verify them in one step; "
                        "the same tokens (the same distribution when sampling), faster where drafts hit")


def _speculation(text: str) -> str:
    """An argparse type: a --speculate spec that Speculation.parse accepts."""
    import argparse

    from amxc.runtime.speculate import Speculation
    try:
        Speculation.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                truncate=args.truncate)


def _engine(args):
    from amxc.api import load
    tokens, nbytes = args.kv_tokens, None
    if args.kv_capacity is not None:
        kind, value = args.kv_capacity
        tokens, nbytes = (value, None) if kind == "tokens" else (None, value)
    import atexit
    engine = load(args.model, quant=args.quant, progress=True, tp=args.tp or 1, kv=args.kv, kv_tokens=tokens,
                  kv_bytes=nbytes, bind=args.bind, transport=args.transport,
                  speculate=getattr(args, "speculate", None))
    atexit.register(engine.close)          # a sharded artifact's rank processes stop with us
    return engine


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def capacity(text: str) -> tuple[str, int]:
    """An argparse type: ('tokens', n) for a plain integer, ('bytes', n) for a size with a unit."""
    import argparse
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or (unit and unit not in _UNITS) or (not unit and "." in m.group(1)):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a token count (4096) nor a size (512MiB, 2GiB)")
    value = int(float(m.group(1)) * _UNITS[unit]) if unit else int(m.group(1))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the KV cache needs a positive size")
    return ("bytes" if unit else "tokens"), value


def cmd_run(args) -> int:
    engine = _engine(args)
    prompt = engine.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    options = {**_sampling(args), "add_special_tokens": not args.chat}
    reason = None
    if args.stream:
        for event in engine.stream(prompt, **options):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            reason = event.finish_reason or reason
        sys.stdout.write("\n")
    else:
        result = engine.generate(prompt, **options)
        print(result.text)
        reason = result.finish_reason
    _warn_cut(reason, args)
    if args.timing:
        print(engine.last_timings.summary(), file=sys.stderr)
        stats = engine.scheduler.stats
        if stats.drafted_tokens:
            print(f"speculation: {stats.accepted_tokens} of {stats.drafted_tokens} drafted tokens accepted "
                  f"({stats.accepted_tokens / stats.drafted_tokens:.0%})", file=sys.stderr)
    return 0


def _warn_cut(reason: str | None, args) -> None:
    if reason == "kv_full":
        print("amxc: warning: the KV cache filled up (--kv-tokens / --kv-capacity); the output stops there",
              file=sys.stderr)


def at_least(low: int):
    """An argparse type: an integer >= low, with the bound in the error."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def cmd_chat(args) -> int:
    engine = _engine(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        reply, reason = [], None
        for event in engine.stream(engine.chat_prompt(messages), add_special_tokens=False, **_sampling(args)):
            reply.append(event.text)
            sys.stdout.write(event.text)
            sys.stdout.flush()
            reason = event.finish_reason or None
        sys.stdout.write("\n")
        _warn_cut(reason, args)
        messages.append({"role": "assistant", "content": "".join(reply).strip()})


def cmd_eval(args) -> int:
    from amxc.errors import read_user_text
    text = read_user_text(args.text)
    if args.compare:
        from amxc.compare import format_rows, side_by_side
        rows = side_by_side([args.model, *args.compare], text, window=args.window or 512,
                            stride=args.stride, max_tokens=args.max_tokens, kv=args.kv, progress=True)
        print(json.dumps([r.to_json() for r in rows]) if args.json else format_rows(rows))
        return 0
    engine = _engine(args)
    try:
        r = engine.perplexity(text, window=args.window, stride=args.stride, max_tokens=args.max_tokens,
                              progress=True)
    except ValueError as e:
        from amxc.errors import UsageError
        raise UsageError(f"{args.text}: {e}") from None
    figures = {"model": engine.module.name, "text": args.text, **r.to_json()}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{args.text}: perplexity {r.perplexity:.4f} (mean NLL {r.mean_nll:.4f}) over "
              f"{r.tokens_scored} tokens, {r.windows} windows of {r.window}, stride {r.stride}")
    return 0


def cmd_bench(args) -> int:
    from amxc.runtime.ranks import peak_rss_mb
    engine = _engine(args)
    vocab = int(engine.config.get("vocab_size", 256))
    prompt = np.random.default_rng(0).integers(3, vocab, args.prompt_tokens).tolist()
    # a process's first generation pays one-time costs (thread start-up, first touches of memory,
    # which can stall on huge-page compaction: SmolLM2's first 128-token prefill took 0.09-1.5 s
    # here against 0.07 s after, before the KV cache was touched at load); llama-bench's warm-up
    # run skips them too
    warm_up_s = None if args.cold else engine.warm_up()
    t0 = time.perf_counter()
    engine.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)
    wall = time.perf_counter() - t0
    t = engine.last_timings
    figures = {
        "model": engine.module.name,
        "prompt_tokens": t.prefill_tokens, "new_tokens": t.decode_tokens + 1,
        "prefill_tok_s": round(t.prefill_tokens_per_s, 2), "decode_tok_s": round(t.decode_tokens_per_s, 2),
        "decode_ms_per_token": round(1000 * sum(t.decode) / max(len(t.decode), 1), 2),
        "wall_s": round(wall, 2),
        "warm_up_s": None if warm_up_s is None else round(warm_up_s, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "kv_cache_mb": round(engine.scheduler.storage.nbytes / 2**20, 1),
        "executor": engine.program.name,
    }
    if getattr(engine.program, "ways", 1) > 1:
        engine.close()                                 # the ranks report their peak RSS as they stop
        per_rank = getattr(engine.program, "peak_rss_mb", None)
        if per_rank:
            figures["peak_rss_mb_per_rank"] = {r: round(mb, 1) for r, mb in per_rank.items()}
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:<22} {v}")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from amxc.runtime.server import create_app
    from amxc.runtime.service import EngineService
    if args.port > 65535:
        from amxc.errors import UsageError
        raise UsageError(f"--port {args.port} is not a TCP port (1-65535)")
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    engine = _engine(args)
    service = EngineService(engine, max_queue=args.max_queue, warm_up=True)
    service.ready.wait()
    name = args.served_model_name or engine.module.name
    app = create_app(service, name, api_key=args.api_key)
    kv = engine.settings
    print(f"amxc: serving {name} on http://{args.host}:{args.port}/v1 ({engine.program.name}, KV cache "
          f"{kv.num_blocks * kv.block_size} tokens, {engine.scheduler.storage.nbytes / 2**20:.0f} MiB)",
          file=sys.stderr)
    # On SIGTERM uvicorn stops accepting, lets the requests in flight finish (30 s at most), puts
    # back the handler it found and raises the signal again: this no-op handler makes that a
    # normal return, so the engine is closed below and the exit status is 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    finally:
        service.close(drain=True, timeout=60)
    print("amxc: server stopped", file=sys.stderr)
    return 0


COMMANDS = {"serve": cmd_serve, "run": cmd_run, "chat": cmd_chat, "eval": cmd_eval, "bench": cmd_bench}

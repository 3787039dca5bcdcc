"""Load test of OpenAI-compatible servers on loopback: `amxc serve` against llama.cpp and vLLM
(issue "amxc serve", must-show 3 and 4).  A measurement, not a test.

    python benchmarks/serve_load.py ARTIFACT.amxc [--llama-cpp MODEL.gguf] [--vllm HF_DIR]
           [--clients 16,64] [--requests N] [--max-tokens 64] [--time-limit 180] [--drain 60]
           [--prompts 32] [--no-solo-repeat] [--out DIR] [--json FILE]

e.g. (every path is this host's; each anchor is optional and reported as skipped when left out):

    python benchmarks/serve_load.py /tmp/amxc-bench/smollm2-nf4-serving.amxc \
        --llama-cpp /work/shared/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf \
        --vllm /tmp/amxc-bench/smollm2-hf --vllm-bin /work/vllm-venv/bin/python --json serve_load.json

Each server is started here as a subprocess on a free 127.0.0.1 port, one at a time (a server
gets every core while it is measured), waited for (GET /v1/models), measured and stopped
(SIGTERM to its process group, SIGKILL after a grace period; also on Ctrl-C and on errors).
Its output goes to OUT/<server>.log, whose tail is printed when it fails.

Per server, with the same prompts (distinct passages of /work/shared/eval text, about 20 to 200
tokens) and `/v1/completions`, `temperature 0`, `stream true`, `max_tokens` fixed and EOS
ignored (`ignore_eos` where the server accepts it, llama.cpp: a -100 logit bias on its EOS):

  1. warm-up: one request (a passage of its own);
  2. solo: each prompt the load phase uses, alone and in turn; its text is the reference.  Then
     once more (--no-solo-repeat skips it): the prompts are now in any prefix cache, as in the
     load phase, so a text that changes here changed without batching (`mism2` compares the
     load texts with these);
  3. load, at each --clients level: that many concurrent streaming clients share --requests
     requests (default 2 per client); none starts after --time-limit, and those still running
     --drain seconds later are `cut` (their streamed tokens count).  Per request: TTFT (send -> first
     chunk with text), ITL (gaps between successive chunks with text: per token when a server
     sends one token a chunk; `tok/chunk` in the table says when it does not), end-to-end
     latency, completion tokens (the usage chunk; chunks with text where a server sends none),
     and whether the stream ended properly (a finish_reason and `data: [DONE]`; else `lost`).
     Each text is compared with its prompt's solo text: greedy decoding should not depend on
     what else is in the batch (`mism`; `--corrupt-solo` checks that the comparison bites).
     Output tok/s = completion tokens / wall time of the level, first send to last response;
  4. amxc only, killed clients: a few long streams are cut mid-stream by closing their
     connections; the `amxc_kv_cache_usage_ratio` gauge of /metrics must return to its idle
     value (within 30 s), and a request after it must still match its solo text.

Prints a table (server x clients) and amxc / best-anchor ratios for tok/s and p99 TTFT; --json
writes every figure (per request too).
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

try:
    import httpx
except ImportError:                      # this venv's openai depends on the renamed fork
    import httpx2 as httpx

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("AMXC_SHARED") or HERE.parents[1] / "shared")
HOST = "127.0.0.1"
KV_GAUGE = "amxc_kv_cache_usage_ratio"


# -- host -----------------------------------------------------------------------------------------
def host_info() -> dict:
    model = "?"
    with contextlib.suppress(OSError):
        model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                      if l.startswith("model name")), "?")
    return {"cpu": model, "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "machine": platform.machine(), "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}        # other work on the host skews every figure


# -- prompts --------------------------------------------------------------------------------------
def load_prompts(eval_dir: Path, n: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    """n distinct passages, alternately from each text in eval_dir, of lengths spread evenly over
    [min_words, max_words] (a word is about 1.3 tokens) and shuffled so the load phase mixes them."""
    texts = [p.read_text(encoding="utf-8").split() for p in sorted(eval_dir.glob("*.txt"))]
    if not texts:
        raise SystemExit(f"no *.txt in {eval_dir}")
    rng = random.Random(seed)
    lengths = [round(min_words + (max_words - min_words) * i / max(1, n - 1)) for i in range(n)]
    rng.shuffle(lengths)
    prompts: list[str] = []
    for i, length in enumerate(lengths):
        words = texts[i % len(texts)]
        start = rng.randrange(200, max(201, len(words) - length))     # past titles and headers
        while start < len(words) - length and not words[start - 1].endswith((".", "!", "?")):
            start += 1                                                   # begin at a sentence
        prompts.append(" ".join(words[start:start + length]))
    return prompts


# -- servers --------------------------------------------------------------------------------------
@dataclass
class ServerSpec:
    name: str
    cmd: list[str]                        # '{port}' is replaced by the port
    env: dict[str, str]
    ready_timeout: float
    extra_body: dict[str, Any]            # fields that make EOS not end a request
    eos_handling: str
    metrics: bool = False                 # amxc: run the killed-client check


_LIVE: set[subprocess.Popen] = set()       # killed at exit whatever happened


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the server's process group (vLLM has engine children), SIGKILL after `grace`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):             # stragglers of the group too
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    _LIVE.discard(proc)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        stop(proc, grace=2.0)


def log_tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def running(spec: ServerSpec, log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    cmd = [c.replace("{port}", str(port)) for c in spec.cmd]
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        env = {**os.environ, **spec.env}
        for k in [k for k, v in spec.env.items() if v == ""]:       # "" in spec.env: unset
            del env[k]
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)     # its own group: stop() reaches children
    _LIVE.add(proc)
    try:
        yield proc, f"http://{HOST}:{port}"
    finally:
        stop(proc)


async def wait_ready(client: httpx.AsyncClient, base: str, proc: subprocess.Popen, timeout: float) -> str:
    """Poll GET /v1/models until it answers 200; returns the served model id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            r = await client.get(f"{base}/v1/models", timeout=5.0)
            if r.status_code == 200:
                return r.json()["data"][0]["id"]
        await asyncio.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout:.0f} s")


# -- one streaming request ------------------------------------------------------------------------
@dataclass
class Result:
    prompt: int
    ok: bool = False                      # finish_reason seen and the stream ended with [DONE]
    error: str = ""
    cut: bool = False                     # stopped at the level's hard deadline, not failed
    text: str = ""
    tokens: int = 0                       # completion tokens (usage, else chunks with text)
    tokens_from_usage: bool = False
    chunks: int = 0                       # SSE events with text
    finish_reason: str | None = None
    ttft: float | None = None             # seconds
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    t_end: float = 0.0                    # perf_counter at the end, for the level's wall time


def parse_event(line: str) -> str | None:
    """The payload of an SSE `data:` line, None for comments, other fields and blank lines."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


async def stream_completion(client: httpx.AsyncClient, base: str, body: dict, prompt: int,
                            timeout: float, stop_at: float | None = None) -> Result:
    """One streaming request, within `timeout` seconds and before perf_counter() `stop_at`
    (a level's hard deadline: a request stopped by it is `cut`, not lost)."""
    res = Result(prompt)
    t0 = time.perf_counter()
    cut_first = stop_at is not None and stop_at - t0 < timeout
    if cut_first:
        timeout = max(0.0, stop_at - t0)
    last = None
    done = False
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return res
                parts: list[str] = []
                async for line in r.aiter_lines():
                    data = parse_event(line)
                    if data is None or data == "":
                        continue
                    if data == "[DONE]":
                        done = True
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        res.error = f"error event: {str(ev['error'])[:200]}"
                        break
                    for ch in ev.get("choices") or []:
                        text = ch.get("text") or ""
                        if text:
                            now = time.perf_counter()
                            if last is None:
                                res.ttft = now - t0
                            else:
                                res.itl.append(now - last)
                            last = now
                            res.chunks += 1
                            parts.append(text)
                        if ch.get("finish_reason"):
                            res.finish_reason = ch["finish_reason"]
                    if ev.get("usage"):
                        res.tokens = int(ev["usage"].get("completion_tokens") or 0)
                        res.tokens_from_usage = True
                res.text = "".join(parts)
    except TimeoutError:
        res.cut = cut_first
        res.error = "cut at the level's hard deadline" if cut_first else f"timed out after {timeout:.0f} s"
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    res.t_end = time.perf_counter()
    res.e2e = res.t_end - t0
    if not res.tokens_from_usage or res.cut:
        res.tokens = res.chunks
    if not res.error and not (done and res.finish_reason):
        res.error = "stream ended without " + ("a finish_reason" if done else "data: [DONE]")
    res.ok = not res.error
    return res


def request_body(model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}


# -- phases ---------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank), in ms."""
    if not xs:
        return None
    s = sorted(xs)
    return 1000.0 * s[min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))]


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(results: list[Result], solo: dict[int, str], prompts: list[str], what: str = "load") -> tuple[int, str]:
    """Count texts that differ from their prompt's solo text; describe the first."""
    bad, first = 0, ""
    for r in results:
        if r.ok and r.text != solo.get(r.prompt):
            bad += 1
            if not first:
                ref = solo.get(r.prompt, "")
                i = first_difference(ref, r.text)
                first = (f"prompt {r.prompt} ({len(prompts[r.prompt].split())} words) differs at char {i}: "
                         f"solo {ref[max(0, i - 20):i + 30]!r} vs {what} {r.text[max(0, i - 20):i + 30]!r}")
    return bad, first


async def run_level(client: httpx.AsyncClient, base: str, bodies: list[dict], clients: int, requests: int,
                    time_limit: float, drain: float, timeout: float) -> tuple[list[Result], float, int]:
    """`clients` workers share `requests` requests (prompts in turn); none starts after
    `time_limit`, and whatever still runs at time_limit + drain is cut (a server that serialises
    requests would otherwise hold the level for clients x one request's time).
    Returns the results, the wall time (first send -> last response) and the unsent count."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i % len(bodies))
    results: list[Result] = []
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    stop_at = deadline + drain

    async def worker() -> None:
        while time.perf_counter() < deadline:
            try:
                p = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await stream_completion(client, base, bodies[p], p, timeout, stop_at))

    tasks = [asyncio.create_task(worker()) for _ in range(clients)]
    _, pending = await asyncio.wait(tasks, timeout=time_limit + drain + 30.0)     # only if one hangs
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = max((r.t_end for r in results), default=t0) - t0
    return results, wall, queue.qsize()


def summarise(results: list[Result], wall: float) -> dict:
    """Level figures.  Tokens a cut request streamed count (the server made them within the
    wall time); its latencies count only where known, except that a cut request that got no
    first token adds its time so far to TTFT, which then is a lower bound."""
    ok = [r for r in results if r.ok]
    cut = [r for r in results if r.cut]
    tokens = sum(r.tokens for r in ok + cut)
    chunks = sum(r.chunks for r in ok)
    itl = [x for r in ok + cut for x in r.itl]
    ttft = [r.ttft for r in ok + cut if r.ttft is not None] + [r.e2e for r in cut if r.ttft is None]
    return {
        "requests": len(results), "ok": len(ok), "cut": len(cut), "lost": len(results) - len(ok) - len(cut),
        "completion_tokens": tokens, "wall_s": wall, "tok_s": tokens / wall if wall > 0 else 0.0,
        "tok_per_chunk": sum(r.tokens for r in ok) / chunks if chunks else None,
        "tokens_from_usage": all(r.tokens_from_usage for r in ok) if ok else None,
        "ttft_lower_bound": any(r.ttft is None for r in cut),
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99),
        "e2e_p50_ms": pct([r.e2e for r in ok], 50), "e2e_p99_ms": pct([r.e2e for r in ok], 99),
        "finish_reasons": sorted({str(r.finish_reason) for r in ok}),
        "errors": sorted({r.error for r in results if r.error and not r.cut})[:5],
    }


def per_request(results: list[Result], solo: dict[int, str]) -> list[dict]:
    return [{"prompt": r.prompt, "ok": r.ok, "cut": r.cut, "error": r.error, "tokens": r.tokens, "chunks": r.chunks,
             "finish_reason": r.finish_reason, "ttft_ms": None if r.ttft is None else 1000 * r.ttft,
             "e2e_ms": 1000 * r.e2e if r.e2e else None, "matches_solo": r.ok and r.text == solo.get(r.prompt)}
            for r in results]


# -- killed clients (amxc) ------------------------------------------------------------------------
def parse_gauge(text: str, name: str) -> float | None:
    """The value of `name` in Prometheus text format (labels allowed, first sample)."""
    m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+([-+0-9.eEinfNa]+)", text, re.M)
    return float(m.group(1)) if m else None


async def read_gauge(client: httpx.AsyncClient, base: str) -> float | None:
    r = await client.get(f"{base}/metrics", timeout=10.0)
    if r.status_code != 200:
        return None
    return parse_gauge(r.text, KV_GAUGE)


async def killed_clients(client: httpx.AsyncClient, base: str, body: dict, streams: int,
                         chunks_before_kill: int, timeout: float) -> dict:
    """Cut `streams` long streams after a few chunks (their connections closed, not the requests
    finished) and time the KV gauge's return to its idle value."""
    r = await client.get(f"{base}/metrics", timeout=10.0)
    if r.status_code == 404:
        return {"status": "metrics unavailable (GET /metrics: 404)"}
    idle = parse_gauge(r.text, KV_GAUGE) if r.status_code == 200 else None
    if idle is None:
        return {"status": f"metrics unavailable (HTTP {r.status_code}, or no {KV_GAUGE})"}

    async def cut(victim: httpx.AsyncClient) -> int:
        seen = 0
        async with victim.stream("POST", f"{base}/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                data = parse_event(line)
                if data and data != "[DONE]" and any(c.get("text") for c in json.loads(data).get("choices") or []):
                    seen += 1
                    if seen >= chunks_before_kill:
                        break
        return seen

    # A client of their own, closed at once: its connections drop mid-response, as a killed
    # client's would (the stream is left unread, not finished).
    victim = httpx.AsyncClient(timeout=httpx.Timeout(timeout))
    try:
        tasks = [asyncio.create_task(cut(victim)) for _ in range(streams)]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        # The gauge while the streams' KV is still held, read before the connections drop.
        busy = await read_gauge(client, base)
        for t in pending:
            t.cancel()
        seen = [t.result() for t in done if not t.exception()]
    finally:
        await victim.aclose()
    t_kill = time.perf_counter()
    value, waited = None, 0.0
    while waited < 30.0:
        value = await read_gauge(client, base)
        waited = time.perf_counter() - t_kill
        if value is not None and value <= idle + 1e-9:
            return {"status": "pass", "idle": idle, "busy": busy, "after": value, "seconds": waited,
                    "streams_cut": len(seen), "chunks_read": seen}
        await asyncio.sleep(0.1)
    return {"status": "fail", "idle": idle, "busy": busy, "after": value, "seconds": waited,
            "streams_cut": len(seen), "chunks_read": seen}


# -- one server -----------------------------------------------------------------------------------
async def measure(spec: ServerSpec, args: argparse.Namespace, prompts: list[str], warmup: str,
                  levels: list[int]) -> dict:
    out: dict[str, Any] = {"server": spec.name, "cmd": shlex.join(spec.cmd), "eos_handling": spec.eos_handling,
                           "phases_s": {}, "levels": {}}
    log = args.out / f"{spec.name}.log"
    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    timeouts = httpx.Timeout(connect=10.0, read=args.request_timeout, write=10.0, pool=args.request_timeout)
    t = time.perf_counter()
    with running(spec, log) as (proc, base):
        async with httpx.AsyncClient(limits=limits, timeout=timeouts) as client:
            try:
                model = await wait_ready(client, base, proc, spec.ready_timeout)
            except RuntimeError as e:
                print(f"[{spec.name}] {e}; log tail ({log}):\n{log_tail(log)}", file=sys.stderr)
                return {**out, "status": f"failed to start: {e}"}
            out["model"] = model
            out["phases_s"]["start"] = time.perf_counter() - t
            print(f"[{spec.name}] ready in {out['phases_s']['start']:.1f} s at {base}, model {model!r}", flush=True)
            bodies = [request_body(model, p, args.max_tokens, spec.extra_body) for p in prompts]

            # A text of its own: a prompt the solo pass then repeats would find itself cached.
            t = time.perf_counter()
            warm = await stream_completion(client, base, request_body(model, warmup, args.max_tokens, spec.extra_body),
                                           -1, args.request_timeout)
            out["phases_s"]["warmup"] = time.perf_counter() - t
            if not warm.ok:
                print(f"[{spec.name}] warm-up failed: {warm.error}; log tail:\n{log_tail(log)}", file=sys.stderr)
                return {**out, "status": f"warm-up failed: {warm.error}"}

            # Solo: every prompt the load phase will send, alone.
            used = range(min(len(prompts), max(args.requests or 2 * c for c in levels)))
            t = time.perf_counter()
            solo_results = [await stream_completion(client, base, bodies[p], p, args.request_timeout) for p in used]
            out["phases_s"]["solo"] = time.perf_counter() - t
            solo = {r.prompt: r.text for r in solo_results if r.ok}
            if args.corrupt_solo:                      # self-check: the comparison must notice this
                solo[0] = solo.get(0, "") + " [corrupted]"
            s = summarise(solo_results, sum(r.e2e or 0.0 for r in solo_results))
            out["solo"] = {**s, "per_request": per_request(solo_results, solo),
                           "texts": {str(k): v for k, v in solo.items()}}
            print(f"[{spec.name}] solo: {s['ok']}/{s['requests']} ok, {s['tok_s']:.1f} tok/s single-stream, "
                  f"TTFT p50 {fmt(s['ttft_p50_ms'])} ms, ITL p50 {fmt(s['itl_p50_ms'])} ms, "
                  f"tok/chunk {fmt(s['tok_per_chunk'], 2)}, finish {s['finish_reasons']} "
                  f"({out['phases_s']['solo']:.1f} s)", flush=True)
            # Solo again: the prompts are now in any prefix cache, as they are in the load phase.
            # A text that changes here changed without any batching, which tells the two apart.
            repeat: dict[int, str] = {}
            if args.solo_repeat:
                t = time.perf_counter()
                rep = [await stream_completion(client, base, bodies[p], p, args.request_timeout) for p in used]
                out["phases_s"]["solo_repeat"] = time.perf_counter() - t
                repeat = {r.prompt: r.text for r in rep if r.ok}
                n_bad, first = compare(rep, solo, prompts, "again")
                out["solo_repeat"] = {"mismatches": n_bad, "first_mismatch": first,
                                      "texts": {str(k): v for k, v in repeat.items() if v != solo.get(k)}}
                print(f"[{spec.name}] solo repeated: {n_bad}/{len(rep)} differ from the first solo"
                      + (f"\n    first: {first}" if first else "")
                      + f" ({out['phases_s']['solo_repeat']:.1f} s)", flush=True)

            for c in levels:
                n = args.requests or 2 * c
                t = time.perf_counter()
                results, wall, unsent = await run_level(client, base, bodies, c, n, args.time_limit, args.drain,
                                                        args.request_timeout)
                out["phases_s"][f"load_{c}"] = time.perf_counter() - t
                s = summarise(results, wall)
                s["unsent"] = unsent
                s["mismatches"], s["first_mismatch"] = compare(results, solo, prompts)
                if repeat:
                    s["mismatches_vs_repeat"], s["first_mismatch_vs_repeat"] = compare(results, repeat, prompts)
                s["per_request"] = per_request(results, solo)
                out["levels"][str(c)] = s
                print(f"[{spec.name}] {c} clients: {s['ok']}/{n} ok, {s['cut']} cut, {unsent} unsent, "
                      f"{s['tok_s']:.1f} tok/s, mismatches {s['mismatches']} vs solo, "
                      f"{s.get('mismatches_vs_repeat', '-')} vs repeated solo ({out['phases_s'][f'load_{c}']:.1f} s)"
                      + (f"\n    first mismatch: {s['first_mismatch']}" if s["first_mismatch"] else "")
                      + (f"\n    errors: {s['errors']}" if s["errors"] else ""), flush=True)

            if spec.metrics:
                t = time.perf_counter()
                body = {**bodies[-1], "max_tokens": args.kill_max_tokens}
                k = await killed_clients(client, base, body, args.kill_streams, 3, args.request_timeout)
                after = await stream_completion(client, base, bodies[0], 0, args.request_timeout)
                k["request_after"] = (f"failed: {after.error}" if not after.ok else "ok, matches solo"
                                      if after.text == solo.get(0) else "ok, matches repeated solo"
                                      if after.text == repeat.get(0) else "ok, differs from solo")
                out["killed_clients"] = k
                out["phases_s"]["killed_clients"] = time.perf_counter() - t
                print(f"[{spec.name}] killed clients: {k}", flush=True)
    if proc.returncode not in (None, 0, -signal.SIGTERM, -signal.SIGKILL):
        out["exit_code"] = proc.returncode
    out["status"] = "ok"
    return out


# -- report ---------------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_table(runs: list[dict], levels: list[int]) -> None:
    cols = ["server", "clients", "reqs", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "e2e p50",
            "tok/chunk", "lost", "cut", "unsent", "mism", "mism2"]
    rows = []
    for run in runs:
        for c in levels:
            s = run.get("levels", {}).get(str(c))
            if s is None:
                continue
            lb = ">" if s["ttft_lower_bound"] else ""
            rows.append([run["server"], str(c), str(s["requests"]), fmt(s["tok_s"], 1), lb + fmt(s["ttft_p50_ms"]),
                         lb + fmt(s["ttft_p99_ms"]), fmt(s["itl_p50_ms"], 1), fmt(s["itl_p99_ms"], 1),
                         fmt(s["e2e_p50_ms"]), fmt(s["tok_per_chunk"], 2), str(s["lost"]), str(s["cut"]),
                         str(s["unsent"]), str(s["mismatches"]), str(s.get("mismatches_vs_repeat", "-"))])
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]
    print("\n(latencies in ms, '>' a lower bound; lost = failed; cut = stopped at --time-limit + --drain; "
          "unsent = not started within --time-limit; mism = greedy text differs from the first "
          "solo text, mism2 = from the repeated solo text, prompt in any prefix cache)")
    for r in [cols] + rows:
        print("  ".join(v.rjust(w) if i > 0 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))


def ratios(runs: list[dict], levels: list[int]) -> dict:
    """amxc / best anchor per level: tok/s (above 1: amxc faster) and p99 TTFT (below 1: amxc
    answers sooner)."""
    amxc = next((r for r in runs if r["server"] == "amxc" and r.get("levels")), None)
    anchors = [r for r in runs if r["server"] != "amxc" and r.get("levels")]
    out = {}
    for c in levels:
        a = amxc["levels"].get(str(c)) if amxc else None
        others = [(r["server"], r["levels"][str(c)]) for r in anchors if str(c) in r["levels"]]
        if not a or not others:
            continue
        best_tps = max(others, key=lambda o: o[1]["tok_s"])
        with_ttft = [o for o in others if o[1]["ttft_p99_ms"] is not None]
        best_ttft = min(with_ttft, key=lambda o: o[1]["ttft_p99_ms"]) if with_ttft else None
        out[str(c)] = {
            "tok_s": a["tok_s"] / best_tps[1]["tok_s"] if best_tps[1]["tok_s"] else None,
            "tok_s_vs": best_tps[0],
            "ttft_p99": (a["ttft_p99_ms"] / best_ttft[1]["ttft_p99_ms"]
                         if best_ttft and a["ttft_p99_ms"] is not None else None),
            "ttft_p99_vs": best_ttft[0] if best_ttft else None,
        }
    return out


# -- main -----------------------------------------------------------------------------------------
def specs(args: argparse.Namespace, levels: list[int]) -> tuple[list[ServerSpec], list[str]]:
    out, skipped = [], []
    amxc = [args.amxc_python, "-m", "amxc", "serve", str(args.artifact), "--host", HOST, "--port", "{port}",
            "--kv-tokens", str(args.kv_tokens)]
    out.append(ServerSpec("amxc", amxc + shlex.split(args.amxc_args), {}, args.ready_timeout,
                          {"ignore_eos": True}, "ignore_eos", metrics=True))
    if args.llama_cpp:
        eos = gguf_eos(args.llama_cpp)
        cmd = [args.llama_cpp_python, "-m", "llama_cpp.server", "--model", str(args.llama_cpp), "--host", HOST,
               "--port", "{port}", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--n_ctx", str(args.n_ctx),
               # By default a request waiting for the model cuts the running stream short.
               "--interrupt_requests", "False"]
        extra = {"logit_bias": {str(eos): -100.0}, "logit_bias_type": "input_ids"} if eos is not None else {}
        out.append(ServerSpec("llama.cpp", cmd + shlex.split(args.llama_cpp_args), {}, args.ready_timeout, extra,
                              f"logit_bias -100 on EOS {eos}" if eos is not None else "none (EOS id unknown)"))
    else:
        skipped.append("llama.cpp (no --llama-cpp GGUF)")
    if args.vllm:
        bin_ = args.vllm_bin
        cmd = ([bin_, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.vllm)]
               if Path(bin_).name.startswith("python") else [bin_, "serve", str(args.vllm)])
        cmd += ["--host", HOST, "--port", "{port}", "--dtype", args.vllm_dtype, "--max-model-len", str(args.n_ctx),
                "--max-num-seqs", str(max(levels)), "--disable-log-stats"] + shlex.split(args.vllm_args)
        # Its own venv: this one's PYTHONPATH (e.g. a source-tree shim) must not leak into it.
        env = {"PYTHONPATH": "", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        out.append(ServerSpec("vllm", cmd, env, max(args.ready_timeout, args.vllm_ready_timeout),
                              {"ignore_eos": True}, "ignore_eos"))
    else:
        skipped.append("vllm (no --vllm HF_DIR)")
    return out, skipped


def gguf_eos(path: Path) -> int | None:
    with contextlib.suppress(Exception):
        import gguf
        f = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.eos_token_id"]
        return int(f.parts[f.data[0]][0])
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path, help="compiled amxc artifact to serve (amxc serve ARTIFACT)")
    p.add_argument("--llama-cpp", type=Path, metavar="GGUF", help="GGUF of the same weights: llama.cpp anchor")
    p.add_argument("--vllm", type=Path, metavar="HF_DIR", help="HF-format weights of the same model: vLLM anchor")
    p.add_argument("--vllm-bin", default="/work/vllm-venv/bin/python",
                   help="vLLM's `vllm` CLI, or a Python with vLLM (uses -m vllm.entrypoints.openai.api_server; "
                        "default %(default)s)")
    p.add_argument("--vllm-dtype", default="bfloat16", help="vLLM --dtype (default %(default)s)")
    p.add_argument("--vllm-args", default="", help="extra vLLM server arguments (one shell string)")
    p.add_argument("--vllm-ready-timeout", type=float, default=600.0, help="seconds vLLM may take to start")
    p.add_argument("--compile-from", type=Path, default=SHARED / "models" / "smollm2-135m-instruct-q4_1",
                   help="model compiled into ARTIFACT when it does not exist (default %(default)s)")
    p.add_argument("--quant", default="nf4", help="amxc compile --quant for that (default %(default)s)")
    p.add_argument("--amxc-python", default=sys.executable, help="Python that runs `-m amxc serve`")
    p.add_argument("--amxc-args", default="", help="extra `amxc serve` arguments (one shell string)")
    p.add_argument("--kv-tokens", type=int, default=16384,
                   help="amxc KV cache in tokens (default %(default)s: 64 clients x ~250 tokens fit)")
    p.add_argument("--llama-cpp-python", default=sys.executable, help="Python with llama-cpp-python[server]")
    p.add_argument("--llama-cpp-args", default="", help="extra llama_cpp.server arguments (one shell string)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp --n_threads (default: all CPUs)")
    p.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp --n_ctx and vLLM --max-model-len")
    p.add_argument("--clients", default="16,64", help="concurrency levels, comma-separated (default %(default)s)")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: 2 x clients)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens every request generates (default %(default)s)")
    p.add_argument("--time-limit", type=float, default=180.0,
                   help="seconds per level after which no request starts (default %(default)s)")
    p.add_argument("--drain", type=float, default=60.0,
                   help="seconds after --time-limit that running requests may still take before they are cut "
                        "(default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--ready-timeout", type=float, default=180.0, help="seconds a server may take to start")
    p.add_argument("--prompts", type=int, default=32, help="distinct prompts (default %(default)s)")
    p.add_argument("--prompt-words", default="15,150", help="prompt length range in words (~20-200 tokens)")
    p.add_argument("--eval-dir", type=Path, default=SHARED / "eval", help="text to cut prompts from (*.txt)")
    p.add_argument("--kill-streams", type=int, default=4, help="streams cut in the killed-client check")
    p.add_argument("--kill-max-tokens", type=int, default=1024, help="max_tokens of those streams")
    p.add_argument("--servers", default="amxc,llama.cpp,vllm", help="which of the configured servers to run")
    p.add_argument("--out", type=Path, default=Path("/tmp/amxc-bench/serve_load"), help="directory for server logs")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--no-solo-repeat", dest="solo_repeat", action="store_false",
                   help="skip the second solo pass (it separates prefix-cache effects from batching ones)")
    p.add_argument("--corrupt-solo", action="store_true",
                   help="self-check: alter prompt 0's solo text so the comparison must report mismatches")
    return p.parse_args(argv)


def ensure_artifact(args: argparse.Namespace) -> None:
    """Compile the artifact from --compile-from when it is not there yet."""
    if args.artifact.exists():
        return
    cmd = [args.amxc_python, "-m", "amxc", "compile", str(args.compile_from), "-o", str(args.artifact),
           "--quant", args.quant]
    print(f"{args.artifact} missing; compiling: {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)


async def main_async(args: argparse.Namespace) -> int:
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    lo, hi = (int(w) for w in args.prompt_words.split(","))
    *prompts, warmup = load_prompts(args.eval_dir, args.prompts + 1, lo, hi)
    args.out.mkdir(parents=True, exist_ok=True)
    info = host_info()
    print(f"host: {info['cpu']}, {info['cpus']} CPUs ({info['cpus_usable']} usable), {info['machine']}, "
          f"load average {info['loadavg_at_start'][0]:.2f}; "
          f"amxc threads {os.environ.get('AMXC_NUM_THREADS') or 'all CPUs'}, llama.cpp --n_threads {args.threads}, "
          f"vLLM its default (VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'auto')})")
    if info["loadavg_at_start"][0] > 1.0:
        print("warning: the host is busy before any server starts (load average above 1); on 2 cores "
              "every figure below is skewed by it", flush=True)
    print(f"load: clients {levels}, requests/level {args.requests or '2 x clients'}, max_tokens {args.max_tokens}, "
          f"{len(prompts)} prompts of {lo}-{hi} words, time limit {args.time_limit:.0f} s/level", flush=True)
    if "amxc" in args.servers.split(","):
        ensure_artifact(args)
    todo, skipped = specs(args, levels)
    wanted = set(args.servers.split(","))
    skipped += [f"{s.name} (not in --servers)" for s in todo if s.name not in wanted]
    runs: list[dict] = []
    t_all = time.perf_counter()
    for spec in todo:
        if spec.name in wanted:
            runs.append(await measure(spec, args, prompts, warmup, levels))
    print_table(runs, levels)
    r = ratios(runs, levels)
    for c, x in r.items():
        print(f"amxc / {x['tok_s_vs']} tok/s at {c} clients: {fmt(x['tok_s'], 2)} (above 1: amxc faster); "
              f"amxc / {x['ttft_p99_vs']} p99 TTFT: {fmt(x['ttft_p99'], 2)} (below 1: amxc sooner)")
    for run in runs:
        if run.get("status") != "ok":
            print(f"{run['server']}: {run.get('status')}")
        if "killed_clients" in run:
            print(f"{run['server']} killed-client check: {run['killed_clients']}")
    for s in skipped:
        print(f"skipped: {s}")
    print(f"total {time.perf_counter() - t_all:.0f} s; phases (s): " +
          "; ".join(f"{run['server']} " + ", ".join(f"{k} {v:.0f}" for k, v in run["phases_s"].items())
                    for run in runs if run["phases_s"]))
    if args.json:
        args.json.write_text(json.dumps({"host": info, "args": {k: str(v) for k, v in vars(args).items()},
                                         "prompts": prompts, "runs": runs, "ratios": r, "skipped": skipped},
                                        indent=1))
        print(f"wrote {args.json}")
    return 0 if all(run.get("status") == "ok" for run in runs) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`amxc serve`'s HTTP API against the official openai client, on a live server (conftest.py):
completions and chat, plain and streamed, stop strings never leaking, seeded sampling
repeatable, usage equal to the tokenizer's counts, greedy output equal to the engine's own,
logprobs equal to the engine's log-softmax, echo, batched prompts, /tokenize and /detokenize,
/metrics, the per-request log line, and a client gone mid-stream giving back its KV blocks.

Logprob tolerance 1e-3: the server's logits come from decode steps and prompt chunks, the
oracle's from one prefill of the whole sequence, which differ only in summation order and in
per-row activation rounding (measured on SmolLM2 fp32, 400-token prompt, AMX host: prompt
logprobs identical, generated ones within 7.5e-6); the margin covers the other ISA tiers.
"""
from __future__ import annotations

import http.client
import json
import logging
import time
from urllib.parse import urlparse

import numpy as np
import openai                     # the oracle client: a dev dependency, never skipped
import pytest
import torch

MODEL = "smollm2"
KEY = "sk-test-amxc"
LP_TOL = 1e-3


def log_softmax(logits) -> np.ndarray:
    """The oracle's log-softmax: torch's, not the one the server uses."""
    return torch.log_softmax(torch.as_tensor(np.asarray(logits, np.float64)), dim=-1).numpy()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert server.call("/health")[1]["status"] == "ok"


def test_completion_equals_the_engine_and_counts_usage(server, client):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    want = server.reference.generate(prompt, max_new_tokens=12)
    assert out.choices[0].text == want.text
    assert out.usage.prompt_tokens == len(server.reference.tokenizer.encode(prompt))
    assert out.usage.completion_tokens == len(want.ids)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_streamed_chat_equals_the_plain_one(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_chat_content_parts_read_as_their_text(client):
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                           max_tokens=8, temperature=0)
    parts = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Say "},
                                                            {"type": "text", "text": "hi."}]}],
        max_tokens=8, temperature=0)
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_stop_strings_are_cut_and_never_streamed(server, client):
    prompt = "Once upon a time"
    free = server.reference.generate(prompt, max_new_tokens=24).text
    stop = free.strip().split()[3]                      # a word from the middle of the output
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=True))
    assert stop not in streamed and free.startswith(streamed) and len(streamed) < len(free)


def test_seeded_sampling_repeats(client):
    runs = [client.completions.create(model=MODEL, prompt="Once", max_tokens=16, temperature=1.0, seed=s).choices[0].text
            for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_echo_logprobs_score_the_prompt_as_the_engine_does(server, client):
    # what lm-evaluation-harness's local-completions sends for a log-likelihood request
    prompt = "The quick brown fox jumps over the lazy dog."
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=3)
    ids = server.reference.tokenizer.encode(prompt)
    choice = out.choices[0]
    lp = choice.logprobs
    generated = out.usage.completion_tokens
    assert choice.text.startswith(prompt) and len(lp.tokens) == len(ids) + generated == len(lp.token_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    tok = server.reference.tokenizer
    assert lp.tokens[:len(ids)] == [tok.piece(i) for i in ids]
    ref = log_softmax(server.reference.logits(ids))            # row i scores token i + 1
    want = [ref[i, t] for i, t in enumerate(ids[1:])]
    assert np.allclose(lp.token_logprobs[1:len(ids)], want, atol=LP_TOL), \
        np.abs(np.array(lp.token_logprobs[1:len(ids)]) - want).max()
    for pos in range(1, len(ids)):
        top = lp.top_logprobs[pos]
        assert len(top) >= 3 and lp.tokens[pos] in top
        assert max(top.values()) == pytest.approx(ref[pos - 1].max(), abs=LP_TOL)
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    # the generated token: its logprob under the prompt's last row
    assert lp.token_logprobs[len(ids)] == pytest.approx(ref[-1].max(), abs=LP_TOL)


def test_generated_logprobs_streamed_and_plain_agree_with_the_engine(server, client):
    prompt = "Once upon a time"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                              stream=True))
    lps = [x for c in streamed if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert lps == plain.choices[0].logprobs.token_logprobs
    ids = server.reference.tokenizer.encode(prompt)
    gen = server.reference.generate(prompt, max_new_tokens=6).ids
    ref = log_softmax(server.reference.logits(ids + gen))
    want = [ref[len(ids) - 1 + j, t] for j, t in enumerate(gen)]
    assert np.allclose(lps, want, atol=LP_TOL)
    assert plain.choices[0].logprobs.text_offset[0] == len(prompt)


def test_chat_logprobs_and_top_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=4)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 4 and entry.top_logprobs[0].token == entry.token   # greedy: the best
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
    text = "".join(e.token for e in content)
    assert text.startswith(out.choices[0].message.content)


def test_batched_prompts_get_one_choice_each(server, client):
    prompts = ["The capital of France is", "Once upon a time"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    for c, p in zip(out.choices, prompts):
        assert c.text == server.reference.generate(p, max_new_tokens=5).text
    ids = server.reference.tokenizer.encode(prompts[1])
    tokens = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=5, temperature=0)
    assert tokens.choices[1].text == out.choices[1].text


def test_tokenize_and_detokenize_match_the_tokenizer(server):
    tok = server.reference.tokenizer
    code, out, _ = server.call("/tokenize", "POST", {"prompt": "Hello world"})
    assert code == 200 and out["tokens"] == tok.encode("Hello world") and out["count"] == len(out["tokens"])
    code, chat, _ = server.call("/tokenize", "POST", {"messages": [{"role": "user", "content": "Hi"}]})
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert code == 200 and chat["tokens"] == tok.encode(text, add_special_tokens=False)
    code, back, _ = server.call("/detokenize", "POST", {"tokens": out["tokens"]})
    assert code == 200 and back["prompt"] == tok.decode(out["tokens"], skip_special_tokens=False)


def test_metrics_count_requests_and_tokens(server, client):
    before = server.metric("amxc_generation_tokens_total")
    done = server.metric('amxc_requests_finished_total{finish_reason="length"}', default=0.0)
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    _, text, headers = server.call("/metrics")
    assert headers["content-type"].startswith("text/plain")
    assert server.metric("amxc_generation_tokens_total") == before + 4
    assert server.metric('amxc_requests_finished_total{finish_reason="length"}') == done + 1
    for name in ("amxc_time_to_first_token_seconds_count", "amxc_inter_token_latency_seconds_count",
                 "amxc_e2e_request_latency_seconds_count", "amxc_requests_running", "amxc_requests_waiting",
                 "amxc_kv_cache_usage_ratio", "amxc_prefix_cache_hit_rate", "amxc_preemptions_total",
                 "amxc_prompt_tokens_total"):
        assert name in text, name
    assert server.metric("amxc_inter_token_latency_seconds_count") >= 3


def test_each_request_logs_one_line(server, client, caplog):
    with caplog.at_level(logging.INFO, logger="amxc.serve"):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
        deadline = time.time() + 5
        while not caplog.records and time.time() < deadline:
            time.sleep(0.02)
    lines = [r.getMessage() for r in caplog.records if r.name == "amxc.serve"]
    assert len(lines) == 1 and lines[0].startswith("cmpl-")
    assert "generated 3" in lines[0] and "ttft" in lines[0] and "tok/s" in lines[0] and "finish length" in lines[0]


def test_a_client_gone_mid_stream_frees_its_blocks(server):
    u = urlparse(server.url)
    idle = server.metric("amxc_kv_cache_usage_ratio")
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                 body=json.dumps({"prompt": "Once upon a time", "max_tokens": 4000, "stream": True,
                                  "temperature": 0, "ignore_eos": True}))
    r = conn.getresponse()
    assert r.status == 200
    for _ in range(6):
        r.readline()                                     # a few events, then hang up
    assert server.metric("amxc_kv_cache_usage_ratio") > idle
    conn.sock.close()
    conn.close()
    deadline = time.time() + 10                          # running to the end would take ~30 s
    while server.metric("amxc_requests_running") or server.metric("amxc_kv_cache_usage_ratio") > idle:
        assert time.time() < deadline, f"the aborted request still holds the cache: {server.service.stats}"
        time.sleep(0.05)
    assert server.metric('amxc_requests_finished_total{finish_reason="abort"}') >= 1

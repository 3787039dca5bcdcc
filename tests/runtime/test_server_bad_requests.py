"""Bad requests against a live server: each gets its status code and an OpenAI-style error body
whose message names what is wrong; after all of them the server is healthy, has nothing
running, and still answers a normal request.  A full waiting queue answers 429 with Retry-After.
The table BAD is also what the serve issue's closing note prints."""
from __future__ import annotations

import threading
import time

import pytest

from amxc.runtime.openai_api import MAX_PROMPTS

C, CHAT = "/v1/completions", "/v1/chat/completions"
HUGE = b'{"prompt": "' + b"a" * (33 << 20) + b'"}'

# (what, method, path, JSON body or raw bytes, API key override, status, a fragment of the message)
BAD = [
    ("malformed JSON", "POST", C, b"{not json", None, 400, "not valid JSON"),
    ("body is a JSON array", "POST", C, b"[1, 2]", None, 400, "body"),
    ("no prompt", "POST", C, {"max_tokens": 3}, None, 400, "prompt"),
    ("prompt of the wrong type", "POST", C, {"prompt": 3.5}, None, 400, "prompt"),
    ("empty prompt", "POST", C, {"prompt": ""}, None, 400, "empty prompt"),
    ("token id outside the vocabulary", "POST", C, {"prompt": [1, 10 ** 9]}, None, 400, "outside the vocabulary"),
    ("prompt longer than the context", "POST", C, {"prompt": [100] * 9000}, None, 400, "9000"),
    ("negative max_tokens", "POST", C, {"prompt": "x", "max_tokens": -1}, None, 400, "max_tokens"),
    ("absurd max_tokens", "POST", C, {"prompt": "x", "max_tokens": 10 ** 12}, None, 400, "max_tokens"),
    ("max_tokens of the wrong type", "POST", C, {"prompt": "x", "max_tokens": "many"}, None, 400, "max_tokens"),
    ("negative temperature", "POST", C, {"prompt": "x", "temperature": -0.5}, None, 400, "temperature"),
    ("NaN temperature", "POST", C, b'{"prompt": "x", "temperature": NaN}', None, 400, "temperature"),
    ("top_p above 1", "POST", C, {"prompt": "x", "top_p": 2}, None, 400, "top_p"),
    ("negative top_k", "POST", C, {"prompt": "x", "top_k": -5}, None, 400, "top_k"),
    ("negative seed", "POST", C, {"prompt": "x", "seed": -1}, None, 400, "seed"),
    ("n > 1", "POST", C, {"prompt": "x", "n": 2}, None, 400, "n=2"),
    ("presence penalty", "POST", C, {"prompt": "x", "presence_penalty": 0.5}, None, 400, "presence_penalty"),
    ("logit_bias", "POST", C, {"prompt": "x", "logit_bias": {"5": 10}}, None, 400, "logit_bias"),
    ("suffix", "POST", C, {"prompt": "x", "suffix": "end"}, None, 400, "suffix"),
    ("17 stop strings", "POST", C, {"prompt": "x", "stop": ["s"] * 17}, None, 400, "stop"),
    ("logprobs above 20", "POST", C, {"prompt": "x", "logprobs": 50}, None, 400, "logprobs"),
    ("stream_options without stream", "POST", C, {"prompt": "x", "stream_options": {"include_usage": True}}, None,
     400, "stream_options"),
    ("a streamed batch", "POST", C, {"prompt": ["a", "b"], "stream": True}, None, 400, "one prompt"),
    ("too many prompts", "POST", C, {"prompt": ["a"] * (MAX_PROMPTS + 1)}, None, 400, "at most"),
    ("unknown model", "POST", C, {"prompt": "x", "model": "gpt-4"}, None, 404, "not served here"),
    ("body over the size limit", "POST", C, HUGE, None, 413, "over"),
    ("no messages", "POST", CHAT, {"messages": []}, None, 400, "messages"),
    ("unknown role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, None, 400, "role"),
    ("image content part", "POST", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, None, 400, "messages"),
    ("top_logprobs without logprobs", "POST", CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                                     "top_logprobs": 2}, None, 400, "top_logprobs"),
    ("tokenize with neither prompt nor messages", "POST", "/tokenize", {}, None, 400, "exactly one"),
    ("detokenize an unknown id", "POST", "/detokenize", {"tokens": [1, -4]}, None, 400, "outside the vocabulary"),
    ("no API key", "POST", C, {"prompt": "x"}, "", 401, "API key"),
    ("wrong API key", "POST", C, {"prompt": "x"}, "sk-wrong", 401, "API key"),
    ("GET on a POST endpoint", "GET", C, None, None, 405, "Method Not Allowed"),
    ("unknown path", "GET", "/v1/engines", None, None, 404, "Not Found"),
]


def send(server, method, path, body, key):
    raw = body if isinstance(body, bytes) else None
    kwargs = {} if key is None else {"key": key or None}
    return server.call(path, method, None if raw is not None else body, raw=raw, **kwargs)


@pytest.mark.parametrize("what, method, path, body, key, status, fragment", BAD, ids=[row[0] for row in BAD])
def test_bad_request(server, what, method, path, body, key, status, fragment):
    code, payload, _ = send(server, method, path, body, key)
    assert code == status, payload
    err = payload["error"]
    assert fragment in err["message"], err
    assert err["type"] and err["code"] == status


def test_after_every_bad_request_the_server_is_healthy_and_serves(server):
    for _, method, path, body, key, _, _ in BAD:
        send(server, method, path, body, key)
    code, health, _ = server.call("/health")
    assert code == 200 and health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0
    assert health["kv_usage"] == 0
    code, out, _ = server.call(C, "POST", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert code == 200 and out["usage"]["completion_tokens"] >= 1


def test_a_full_queue_answers_429_with_retry_after(serve, smollm2_art):
    # one sequence runs at a time and one may wait: the third concurrent request is refused
    with serve(smollm2_art, max_queue=1, max_seqs=1) as server:
        long = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        results = []
        threads = [threading.Thread(target=lambda: results.append(server.call(C, "POST", long)[0]))
                   for _ in range(2)]
        threads[0].start()
        wait_for(lambda: server.service.stats["running"] == 1)
        threads[1].start()
        wait_for(lambda: server.service.stats["waiting"] == 1)
        code, payload, headers = server.call(C, "POST", long)
        assert code == 429 and headers.get("retry-after") == "1"
        assert payload["error"]["type"] == "rate_limit_error" and "already waiting" in payload["error"]["message"]
        assert 'amxc_requests_rejected_total{reason="queue_full"} 1.0' in server.call("/metrics")[1]
        for t in threads:
            t.join(120)
        assert results == [200, 200]


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_the_table_has_twenty_distinct_kinds():
    assert len(BAD) >= 20 and len({row[0] for row in BAD}) == len(BAD)

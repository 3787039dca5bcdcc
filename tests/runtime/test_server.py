"""`amxc serve`'s HTTP API against the official openai client, on a live server (uvicorn in a
thread of this process, a free loopback port): completions and chat, plain and streamed, stop
strings never leaking, seeded sampling repeatable, usage equal to the tokenizer's counts,
greedy output equal to the engine's own; bad requests get OpenAI-style 4xx bodies and leave
the server healthy; API keys are enforced."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlparse

import openai                     # the oracle client: a dev dependency, never skipped
import pytest
import uvicorn

from amxc.runtime.engine import Engine
from amxc.runtime.server import create_app
from amxc.runtime.service import EngineService

MODEL = "smollm2"
KEY = "sk-test-amxc"


def call(url: str, method: str = "GET", body=None, key: str | None = KEY, raw: bytes | None = None):
    """(status, parsed JSON body) of one plain HTTP request (stdlib only)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, u.path, body=data, headers=headers)
    r = conn.getresponse()
    status, payload = r.status, json.loads(r.read() or b"null")
    conn.close()
    return status, payload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_art):
    engine = Engine.load(smollm2_art)
    reference = Engine.load(smollm2_art)
    service = EngineService(engine, max_queue=8)
    port = free_port()
    config = uvicorn.Config(create_app(service, MODEL, api_key=KEY), host="127.0.0.1", port=port, log_level="error")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", reference, service
    srv.should_exit = True
    thread.join(10)
    service.close(drain=False, timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert call(server[0] + "/health")[1]["status"] == "ok"


def test_completion_equals_the_engine_and_counts_usage(server, client):
    _, reference, _ = server
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    want = reference.generate(prompt, max_new_tokens=12)
    assert out.choices[0].text == want.text
    assert out.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
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


def test_stop_strings_are_cut_and_never_streamed(server, client):
    _, reference, _ = server
    prompt = "Once upon a time"
    free = reference.generate(prompt, max_new_tokens=24).text
    stop = free.strip().split()[3]                      # a word from the middle of the output
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=True))
    assert stop not in streamed and free.startswith(streamed) and len(streamed) < len(free)


def test_seeded_sampling_repeats(client):
    runs = [client.completions.create(model=MODEL, prompt="Once", max_tokens=16, temperature=1.0, seed=s).choices[0].text
            for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


BAD = [
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"prompt": "x", "n": 2}, 400, "n=2"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "not served here"),
    ({"prompt": ""}, 400, "empty prompt"),
    ({"prompt": [1, 10 ** 9]}, 400, "outside the vocabulary"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({}, 400, "prompt"),
    ({"prompt": "x", "stop": ["s"] * 17}, 400, "stop"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
]


@pytest.mark.parametrize("body, status, message", BAD)
def test_bad_requests_get_openai_style_errors(server, body, status, message):
    code, payload = call(server[0] + "/v1/completions", "POST", body)
    assert code == status, payload
    err = payload["error"]
    assert message in err["message"] and err["type"]


def test_malformed_json_wrong_key_and_afterwards_healthy(server, client):
    url = server[0] + "/v1/completions"
    code, payload = call(url, "POST", raw=b"{not json")
    assert code == 400 and "error" in payload
    code, payload = call(url, "POST", {"prompt": "x"}, key="wrong")
    assert code == 401 and payload["error"]["type"] == "authentication_error"
    assert call(url, "POST", {"prompt": "x"}, key=None)[0] == 401
    assert call(server[0] + "/v1/chat/completions", "POST", {"messages": []})[0] == 400
    assert call(server[0] + "/health")[1]["status"] == "ok"
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0).usage.completion_tokens


def test_a_client_gone_mid_stream_frees_its_blocks(server):
    url, _, service = server
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                 body=json.dumps({"prompt": "Once upon a time", "max_tokens": 4000, "stream": True,
                                  "temperature": 0, "ignore_eos": True}))
    r = conn.getresponse()
    assert r.status == 200
    for _ in range(6):
        r.readline()                                     # a few events, then hang up
    conn.sock.close()
    conn.close()
    deadline = time.time() + 10                          # running to the end would take ~30 s
    while service.stats["running"] or service.stats["kv_usage"] > 0:
        assert time.time() < deadline, f"the aborted request still holds the cache: {service.stats}"
        time.sleep(0.05)

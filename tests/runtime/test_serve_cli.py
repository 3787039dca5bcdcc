"""`amxc serve` as a user runs it: a subprocess on a loopback port.  SIGTERM lets the request in
flight finish (its stream ends with [DONE]), takes no new connections, and exits 0; the startup
line reports the KV cache that --kv-capacity asked for; each request leaves one log line."""
from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from amxc.cli_run import capacity

KEY = "sk-cli"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    return conn.getresponse()


def test_sigterm_drains_the_request_in_flight_then_exits(smollm2_art):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "amxc", "serve", str(smollm2_art), "--port", str(port),
                             "--kv-capacity", "16MiB", "--api-key", KEY],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, "".join(lines)
            assert time.time() < deadline, "the server did not come up: " + "".join(lines)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        r = post(port, {"prompt": "Once upon a time", "max_tokens": 48, "stream": True, "temperature": 0,
                        "ignore_eos": True})
        assert r.status == 200
        first = r.readline()
        assert first.startswith(b"data: {")
        proc.send_signal(signal.SIGTERM)
        rest = r.read().decode()                     # the stream runs to its end
        chunks = [first.decode()] + [x for x in rest.split("\n") if x.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]"
        assert sum(json.loads(c[6:])["choices"][0]["text"] != "" for c in chunks[:-1] if c.startswith("data: {")) \
            >= 40
        with pytest.raises(OSError):                 # the listener is closed: nothing new gets in
            post(port, {"prompt": "x", "max_tokens": 1})
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(5)
    log = "".join(lines)
    per_token = 2 * 30 * 3 * 64 * 4                   # SmolLM2-135M: 30 layers, 3 KV heads of 64, fp32
    assert f"KV cache {(16 << 20) // (per_token * 16) * 16} tokens" in log, log
    assert "generated 48" in log and "finish length" in log, log


@pytest.mark.parametrize("text, want", [("4096", ("tokens", 4096)), ("512MiB", ("bytes", 512 << 20)),
                                        ("1.5GB", ("bytes", 1_500_000_000)), ("2 gib", ("bytes", 2 << 30))])
def test_kv_capacity_reads_tokens_or_sizes(text, want):
    assert capacity(text) == want


@pytest.mark.parametrize("text", ["lots", "1.5", "0", "12 parsecs", "-3MiB"])
def test_kv_capacity_refuses_anything_else(text):
    with pytest.raises(argparse.ArgumentTypeError, match="KV cache|neither"):
        capacity(text)

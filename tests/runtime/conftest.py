"""A live `amxc serve` app for the server tests: uvicorn in a thread of this process on a free
loopback port, the engine behind it, and a second engine on the same artifact as the oracle."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import pytest
import uvicorn

from amxc.runtime.engine import Engine
from amxc.runtime.server import create_app
from amxc.runtime.service import EngineService

SERVED_NAME = "smollm2"
API_KEY = "sk-test-amxc"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    reference: Engine            # the same artifact, outside the server: the oracle
    service: EngineService

    def call(self, path: str, method: str = "GET", body=None, key: str | None = API_KEY, raw: bytes | None = None,
             headers: dict | None = None):
        """(status, parsed JSON body or text, headers) of one plain HTTP request (stdlib only)."""
        u = urlparse(self.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        h = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        try:
            payload = json.loads(text or "null")
        except json.JSONDecodeError:
            payload = text
        return r.status, payload, dict(r.getheaders())

    def metric(self, name: str, default: float | None = None) -> float:
        """A sample's value from /metrics (the first line naming it; `default` if none does)."""
        _, text, _ = self.call("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        if default is None:
            raise KeyError(f"{name} not in /metrics")
        return default


@contextmanager
def live_server(art, *, max_queue: int = 8, **settings):
    """Serve the artifact at `art` (engine settings as keyword overrides) on a free loopback port."""
    engine = Engine.load(art, **settings)
    service = EngineService(engine, max_queue=max_queue)
    port = free_port()
    config = uvicorn.Config(create_app(service, SERVED_NAME, api_key=API_KEY), host="127.0.0.1", port=port,
                            log_level="error")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", Engine.load(art), service)
    finally:
        srv.should_exit = True
        thread.join(10)
        service.close(drain=False, timeout=10)


@pytest.fixture(scope="module")
def server(smollm2_art):
    with live_server(smollm2_art) as s:
        yield s


@pytest.fixture(scope="module")
def serve():
    """live_server, for tests that need a server with other settings."""
    return live_server

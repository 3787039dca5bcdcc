"""An OpenAI-compatible HTTP server on the engine service (FastAPI + uvicorn, as vLLM and SGLang).

HTTP handlers only validate, enqueue and stream; one engine thread (service.py) runs the
scheduler.  Endpoints: /health, /v1/models, /v1/completions and /v1/chat/completions (plain
and `stream=true` as server-sent events exactly as OpenAI sends them, `usage` on every
response and, with `stream_options.include_usage`, as a final chunk).  Errors use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`.  A client that disconnects mid-stream aborts
its request; a full waiting queue answers 429 with Retry-After.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .chat_template import ChatTemplateError
from .errors import RequestError
from .service import EngineService, QueueFull, ServiceClosed, request_of

MAX_TOKENS_CAP = 1 << 20


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_CAP)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


class CompletionRequest(_Common):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_body(message: str, kind: str, param: str | None = None, code: int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(service: EngineService, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="amxc", docs_url=None, redoc_url=None, openapi_url=None)
    engine = service.engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.status), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(error_body(f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                                       "invalid_request_error", where or None, 400), 400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(error_body("missing or wrong API key: send 'Authorization: Bearer KEY'",
                                               "authentication_error", None, 401), 401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", **service.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "amxc"}]}

    def check(req: _Common) -> int:
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} is not served here (this server has {model_name!r})",
                           "model", "not_found_error")
        if req.n != 1:
            raise APIError(400, f"n={req.n}: only n=1 is supported", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) != 0.0:
                raise APIError(400, f"{name} is not supported (use 0)", name)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return 16 if limit is None else limit

    def stops(req: _Common) -> list[str]:
        s = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(s) > 16 or any(len(x) > 1024 for x in s):
            raise APIError(400, "stop: at most 16 strings of at most 1024 characters", "stop")
        return s

    async def start(prompt, req: _Common, add_special: bool):
        try:
            sub = request_of(engine, prompt, max_tokens=check(req), temperature=req.temperature, top_p=req.top_p,
                             top_k=req.top_k, seed=req.seed, stop=stops(req), add_special_tokens=add_special,
                             ignore_eos=req.ignore_eos)
            return sub, await service.submit(sub)
        except RequestError as e:
            raise APIError(400, str(e)) from None
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except ServiceClosed as e:
            raise APIError(503, str(e), kind="server_error") from None

    async def events(ticket):
        while True:
            item = await ticket.queue.get()
            if isinstance(item, Exception):
                raise APIError(500, f"the engine failed on this request: {item}", kind="server_error")
            yield item
            if item.finish_reason is not None:
                return

    def usage(sub, generated: int) -> dict:
        return {"prompt_tokens": len(sub.prompt_ids), "completion_tokens": generated,
                "total_tokens": len(sub.prompt_ids) + generated}

    async def respond(sub, ticket, req: _Common, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        if not req.stream:
            text, n, reason = [], 0, None
            try:
                async for ev in events(ticket):
                    text.append(ev.text)
                    n += ev.token is not None
                    reason = ev.finish_reason
            finally:
                service.abort(ticket)
            reason = "length" if reason in ("length", "kv_full") else "stop"
            choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": reason}
                      if chat else {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": reason})
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                    "choices": [choice], "usage": usage(sub, n)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async def stream():
            n = 0
            base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": int(time.time()), "model": model_name}
            try:
                if chat:
                    yield chunk({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                      "finish_reason": None}]})
                async for ev in events(ticket):
                    n += ev.token is not None
                    reason = None if ev.finish_reason is None else \
                        "length" if ev.finish_reason in ("length", "kv_full") else "stop"
                    if ev.text or reason:
                        piece = ({"index": 0, "delta": {"content": ev.text} if ev.text else {}, "finish_reason": reason}
                                 if chat else {"index": 0, "text": ev.text, "logprobs": None, "finish_reason": reason})
                        yield chunk({**base, "choices": [piece]})
                if include_usage:
                    yield chunk({**base, "choices": [], "usage": usage(sub, n)})
                yield "data: [DONE]\n\n"
            finally:                                 # also when the client went away mid-stream
                service.abort(ticket)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.echo or req.logprobs:
            raise APIError(400, "echo and logprobs are not supported yet", "echo" if req.echo else "logprobs")
        sub, ticket = await start(req.prompt, req, add_special=True)
        return await respond(sub, ticket, req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if req.logprobs:
            raise APIError(400, "logprobs are not supported yet", "logprobs")
        if engine.tokenizer is None or not engine.tokenizer.has_chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            prompt = engine.chat_prompt([m.model_dump() for m in req.messages])
        except (RequestError, ChatTemplateError) as e:
            raise APIError(400, str(e), "messages") from None
        sub, ticket = await start(prompt, req, add_special=False)
        return await respond(sub, ticket, req, chat=True)

    return app

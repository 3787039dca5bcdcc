"""An OpenAI-compatible HTTP server on the engine service (FastAPI + uvicorn, as vLLM and SGLang).

HTTP handlers only validate, enqueue and stream; one engine thread (service.py) runs the
scheduler.  Endpoints: /health, /metrics (Prometheus), /v1/models, /v1/completions (string,
token-id or batched prompts, echo, logprobs) and /v1/chat/completions (the model's chat template,
logprobs/top_logprobs), plain or `stream=true` as server-sent events exactly as OpenAI sends them
(`usage` on every response and, with `stream_options.include_usage`, as a final chunk), and
vLLM's /tokenize and /detokenize.  Request schemas and response pieces: openai_api.py.

Everything a client sends is bounded: the body's size (413), every field's type and range (400
naming the field), the prompt against the context and the KV cache (400), the waiting queue
(429 with Retry-After).  A client that disconnects mid-stream aborts its request, which frees
its KV blocks at the next step.  Errors of every kind use OpenAI's body
`{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_template import ChatTemplateError
from .errors import RequestError
from .metrics import CONTENT_TYPE
from .openai_api import (MAX_PROMPTS, MAX_STOP_CHARS, MAX_STOP_STRINGS, ChatRequest, CompletionRequest,
                         DetokenizeRequest, TokenizeRequest, _Common, chat_logprobs, completion_logprobs,
                         error_body, finish_reason, usage)
from .service import EngineService, QueueFull, ServiceClosed, request_of
from .tokenizer import TokenizerError

MAX_BODY_BYTES = 32 << 20          # a 64-prompt batch of long token-id prompts is ~5 MB of JSON
PUBLIC_PATHS = ("/health", "/metrics")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes (413) before reading them when they
    declare their length, and stop reading a chunked one at the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            response = JSONResponse(error_body(f"request body over {self.limit} bytes", "invalid_request_error",
                                               None, 413), 413)
            return await response(scope, receive, send)
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:                     # an undeclared body too long: hang up
                return {"type": "http.disconnect"}
            return message
        return await self.app(scope, bounded, send)


def create_app(service: EngineService, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="amxc", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    engine, tokenizer = service.engine, service.engine.tokenizer
    created = int(time.time())

    # -- errors, auth ----------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.status), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', message)})"
        return JSONResponse(error_body(f"{where or 'body'}: {message}", "invalid_request_error", where or None, 400),
                            400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):          # unknown path, wrong method
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, e.status_code), e.status_code,
                            headers=getattr(e, "headers", None))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path not in PUBLIC_PATHS:
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("missing or wrong API key: send 'Authorization: Bearer KEY'",
                                               "authentication_error", None, 401), 401)
        return await call_next(request)

    # -- plain endpoints -------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", **service.stats}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "amxc", "max_model_len": engine.context}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        need_tokenizer()
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", "prompt")
        if req.messages is not None:
            text = chat_text(req.messages, req.add_generation_prompt)
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": engine.context, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        need_tokenizer()
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)}

    # -- request checks --------------------------------------------------------------------------
    def check_model(model: str | None) -> None:
        if model is not None and model != model_name:
            raise APIError(404, f"model {model!r} is not served here (this server has {model_name!r})",
                           "model", "not_found_error")

    def need_tokenizer() -> None:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send and read token ids", "prompt")

    def chat_text(messages, add_generation_prompt: bool = True) -> str:
        if tokenizer is None or not tokenizer.has_chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            return tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                 add_generation_prompt=add_generation_prompt)
        except (RequestError, ChatTemplateError, TokenizerError) as e:
            raise APIError(400, str(e), "messages") from None

    def check(req: _Common) -> int:
        """The request's token limit, once every field it cannot honour has been refused."""
        check_model(req.model)
        if req.n != 1:
            raise APIError(400, f"n={req.n}: only n=1 is supported", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) != 0.0:
                raise APIError(400, f"{name} is not supported (use 0)", name)
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options needs stream=true", "stream_options")
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return 16 if limit is None else limit

    def stops(req: _Common) -> list[str]:
        s = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(s) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in s):
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                                f"characters", "stop")
        return s

    def submission(prompt, req: _Common, *, add_special: bool, name: str, logprobs=None, prompt_logprobs=None):
        try:
            return request_of(engine, prompt, max_tokens=check(req), temperature=req.temperature, top_p=req.top_p,
                              top_k=max(req.top_k, 0), seed=req.seed, stop=stops(req),
                              add_special_tokens=add_special, ignore_eos=req.ignore_eos, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, name=name)
        except RequestError as e:
            raise APIError(400, str(e)) from None

    async def start(sub):
        try:
            return await service.submit(sub)
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

    def piece(token: int) -> str:
        return tokenizer.piece(token) if tokenizer is not None else f"token_id:{token}"

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    # -- /v1/completions -------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, f"best_of={req.best_of}: only 1 is supported", "best_of")
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
            else [req.prompt]
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts in one request, got {len(prompts)}", "prompt")
        if req.stream and len(prompts) > 1:
            raise APIError(400, "stream=true takes one prompt per request", "prompt")
        rid = "cmpl-" + uuid.uuid4().hex[:24]
        scored = req.echo and req.logprobs is not None
        subs = [submission(p, req, add_special=True, name=f"{rid}-{i}" if len(prompts) > 1 else rid,
                           logprobs=req.logprobs, prompt_logprobs=req.logprobs if scored else None)
                for i, p in enumerate(prompts)]
        tickets = []
        try:
            for sub in subs:
                tickets.append(await start(sub))
        except APIError:
            for t in tickets:
                service.abort(t)
            raise
        texts = [p if isinstance(p, str) else decode_prompt(sub.prompt_ids) for p, sub in zip(prompts, subs)]
        if req.stream:
            return StreamingResponse(stream_completion(rid, subs[0], tickets[0], req, texts[0]),
                                     media_type="text/event-stream")
        try:
            results = await asyncio.gather(*(collect(t) for t in tickets))
        finally:
            for t in tickets:
                service.abort(t)
        choices, generated = [], 0
        for i, (sub, ticket, text, (out, tokens, lps, reason)) in enumerate(zip(subs, tickets, texts, results)):
            generated += len(tokens)
            lp = None
            if req.logprobs is not None:
                entries = list(zip(tokens, lps))
                if req.echo:
                    entries = prompt_entries(sub, ticket) + entries
                lp = completion_logprobs(entries, piece, 0 if req.echo else len(text))
            choices.append({"index": i, "text": (text if req.echo else "") + out, "logprobs": lp,
                            "finish_reason": finish_reason(reason)})
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": usage(sum(len(s.prompt_ids) for s in subs), generated)}

    def decode_prompt(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False) if tokenizer is not None else ""

    def prompt_entries(sub, ticket) -> list:
        scores = ticket.prompt_logprobs or [None] * len(sub.prompt_ids)
        return list(zip(sub.prompt_ids, scores))

    async def collect(ticket):
        text, tokens, lps, reason = [], [], [], None
        async for ev in events(ticket):
            text.append(ev.text)
            if ev.token is not None:
                tokens.append(ev.token)
                lps.append(ev.logprob)
            reason = ev.finish_reason
        return "".join(text), tokens, lps, reason

    async def stream_completion(rid, sub, ticket, req: CompletionRequest, prompt_text: str):
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}
        offset, n = (0 if req.echo else len(prompt_text)), 0
        echoed = not req.echo
        try:
            async for ev in events(ticket):
                if not echoed:          # the prompt's logprobs are on the ticket by its first event
                    lp = completion_logprobs(prompt_entries(sub, ticket), piece, 0) \
                        if req.logprobs is not None else None
                    offset, echoed = len(prompt_text), True
                    yield sse({**base, "choices": [{"index": 0, "text": prompt_text, "logprobs": lp,
                                                    "finish_reason": None}]})
                n += ev.token is not None
                reason = finish_reason(ev.finish_reason)
                lp = None
                if req.logprobs is not None and ev.logprob is not None:
                    lp = completion_logprobs([(ev.token, ev.logprob)], piece, offset)
                    offset += len(lp["tokens"][0])
                if ev.text or reason or lp:
                    yield sse({**base, "choices": [{"index": 0, "text": ev.text, "logprobs": lp,
                                                    "finish_reason": reason}]})
            if req.stream_options and req.stream_options.include_usage:
                yield sse({**base, "choices": [], "usage": usage(len(sub.prompt_ids), n)})
            yield "data: [DONE]\n\n"
        finally:                                 # also when the client went away mid-stream
            service.abort(ticket)

    # -- /v1/chat/completions --------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        prompt = chat_text(req.messages)
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        k = (req.top_logprobs or 0) if req.logprobs else None
        sub = submission(prompt, req, add_special=False, name=rid, logprobs=k)
        ticket = await start(sub)
        if not req.stream:
            try:
                text, tokens, lps, reason = await collect(ticket)
            finally:
                service.abort(ticket)
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": chat_logprobs(lps, piece) if k is not None else None,
                                 "finish_reason": finish_reason(reason)}],
                    "usage": usage(len(sub.prompt_ids), len(tokens))}
        return StreamingResponse(stream_chat(rid, sub, ticket, req, k), media_type="text/event-stream")

    async def stream_chat(rid, sub, ticket, req: ChatRequest, k):
        base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}
        n = 0
        try:
            yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
            async for ev in events(ticket):
                n += ev.token is not None
                reason = finish_reason(ev.finish_reason)
                lp = chat_logprobs([ev.logprob], piece) if k is not None and ev.logprob is not None else None
                if ev.text or reason or lp:
                    yield sse({**base, "choices": [{"index": 0, "delta": {"content": ev.text} if ev.text else {},
                                                    "logprobs": lp, "finish_reason": reason}]})
            if req.stream_options and req.stream_options.include_usage:
                yield sse({**base, "choices": [], "usage": usage(len(sub.prompt_ids), n)})
            yield "data: [DONE]\n\n"
        finally:
            service.abort(ticket)

    return app

"""OpenAI's HTTP schemas as the server reads and writes them: pydantic models of the requests
(every field typed and bounded, so that a wrong type or an absurd value is a 400 naming the
field before any work), the error body, and the response pieces (usage, logprobs objects).

Fields OpenAI defines that amxc cannot honour (n > 1, penalties, logit_bias, suffix, best_of)
are accepted only at their neutral value and otherwise refused with a message, never ignored:
a client must not get an answer it did not ask for.  Unknown extra fields are ignored, as
OpenAI and vLLM do (clients send vendor fields)."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .logprobs import MAX_TOP_LOGPROBS, TokenLogprob

MAX_TOKENS_CAP = 1 << 20           # beyond any context: a larger value is a client bug
MAX_PROMPTS = 64                   # prompts in one /v1/completions batch
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1024


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Model):
    include_usage: bool = False


class _Common(_Model):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_CAP)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=1 << 20)            # vLLM spells "off" -1, OpenAI has no top_k
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False                             # vLLM's extension: benchmarks
    user: str | None = None


Prompt = Union[str, list[int], list[str], list[list[int]]]


class CompletionRequest(_Common):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class Message(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


def error_body(message: str, kind: str, param: str | None = None, code: int | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    """OpenAI knows 'stop' and 'length'; a full KV cache ends a sequence as its length does."""
    return None if reason is None else "length" if reason in ("length", "kv_full") else "stop"


def completion_logprobs(entries: list[tuple[int, TokenLogprob | None]], piece, offset: int) -> dict:
    """The legacy completions object for (token, logprob) pairs: token texts, their logprobs, top
    alternatives as {text: logprob} (the token itself included, as vLLM does), and each token's
    character offset in the returned text, counted from `offset`.  The first prompt token has
    no logprob (nothing precedes it): None there, as OpenAI sends it."""
    tokens, lps, tops, offsets = [], [], [], []
    for token, e in entries:
        text = piece(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if e is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(e.logprob)
        top = {piece(i): lp for i, lp in e.top}
        top.setdefault(text, e.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], piece) -> dict:
    def item(token: int, logprob: float) -> dict:
        text = piece(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for e in entries]}

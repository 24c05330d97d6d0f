"""OpenAI's HTTP API, the parts quiver serves: request bodies, response objects, errors.

Request bodies are validated by pydantic; anything invalid is an `ApiError`, answered in
OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` with a 4xx status.
Every number has the range OpenAI documents and the engine honours: `temperature` 0 to 2
(below 1e-5 it is greedy, as 0), `top_p` above 0 up to 1, `seed` a 64-bit signed integer,
`max_tokens` at least 1 (and at most the server's limit), `n` 1, penalties -2 to 2 (only 0
implemented), at most 4 `stop` strings.
Parameters quiver does not implement (several choices, log-probabilities, echo, penalties,
tools) are refused by name rather than silently ignored; fields it does not know are ignored,
as OpenAI's own clients send some (`user`, `metadata`, ...).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quiver.serving.sampling import SEED_RANGE

MAX_INT32 = 2**31 - 1  # the largest token count a request may name


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Request(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: _StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=128)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def refuse_unsupported(self) -> None:
        """Refuse parameters quiver does not implement, by name."""
        unsupported = {"n": self.n != 1, "presence_penalty": self.presence_penalty != 0,
                       "frequency_penalty": self.frequency_penalty != 0,
                       "logit_bias": bool(self.logit_bias)}
        for name, used in unsupported.items():
            if used:
                raise ApiError(400, f"{name} is not supported by this server", param=name)


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=128)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, "one prompt per request (batch them as separate requests)",
                               param="prompt")
            return self.prompt[0]
        return self.prompt

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        used = {"echo": self.echo, "logprobs": self.logprobs, "suffix": self.suffix,
                "best_of": self.best_of not in (None, 1)}
        for name, value in used.items():
            if value:
                raise ApiError(400, f"{name} is not supported by this server", param=name)


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart] | None = None

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role,
                "content": content or ""}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        used = {"logprobs": self.logprobs, "top_logprobs": self.top_logprobs is not None,
                "tools": bool(self.tools),
                "response_format": (self.response_format or {"type": "text"}).get("type")
                != "text"}
        for name, value in used.items():
            if value:
                raise ApiError(400, f"{name} is not supported by this server", param=name)


def parse(cls: type[_Request], data: object) -> _Request:
    """A validated request body.

    Raises:
        ApiError: 400 naming the first invalid parameter.
    """
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"invalid {param}: {first['msg']}", param=param,
                       code="invalid_value") from None
    request.refuse_unsupported()
    return request


# ---------------------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, model: str, text: str, finish: str | None, usage_: dict | None,
               chunk: bool = False) -> dict:
    """A `text_completion` object (a whole completion, or one streamed chunk of it)."""
    body = {"id": id, "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "text": text, "logprobs": None,
                                         "finish_reason": finish}]}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_completion(id: str, model: str, text: str, finish: str, usage_: dict) -> dict:
    """A whole `chat.completion` object."""
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage_}


def chat_chunk(id: str, model: str, delta: dict | None, finish: str | None,
               usage_: dict | None = None) -> dict:
    """One `chat.completion.chunk`; with `delta` None, the final usage-only chunk."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish}]
    body = {"id": id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def models_list(names: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "quiver"} for name in names]}

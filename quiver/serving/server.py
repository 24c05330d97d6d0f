"""`quiver serve`: an OpenAI-compatible HTTP server over a library (FastAPI + uvicorn).

    GET  /health                 the engine's load; no key needed
    GET  /v1/models              what a request can name: base, arrow, uniform, expert:NAME
    POST /v1/completions         text completion, streamed (server-sent events) or not
    POST /v1/chat/completions    chat completion with the tokenizer's chat template

Safe by default: it binds 127.0.0.1; with an API key every /v1 request must carry
`Authorization: Bearer KEY` (401 otherwise); a request body over `max_body_bytes`, a prompt
over `max_prompt_tokens`, `max_tokens` over its limit, an unknown model or a bad parameter is
a 4xx in OpenAI's error shape. At most `max_concurrent` requests are accepted at once: up to
`max_batch` of them are generated together and the rest wait in the engine's queue; one more
is answered 429 at once (never queued without bound). A request's slot is freed when the
request ends or its client disconnects (its row leaves the batch at the engine's next step). The
model names a request can use are looked up in the fixed table made at start-up
(`ServedModel.routes`); nothing a request sends is used as a path, and the library is only
read (at start-up).

One request never hurts another: a body that is not a JSON object of the right shape (not
JSON, nested too deeply, a number too long, another content type) is a 400; a row that fails
in the engine ends its own request alone (a 500, or an error event then `[DONE]` in a stream);
any other exception is a 500 in OpenAI's shape that leaves the connection open. Every
response carries an `x-request-id`; every 5xx and every failed row is logged in one line with
it, and a client that goes away before its answer in one line too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from quiver.errors import QuiverError
from quiver.serving import openai_api as api
from quiver.serving.config import ServeConfig
from quiver.serving.engine import Engine, EngineConfig, Event, Request
from quiver.serving.generate import chat_ids, stop_ids
from quiver.serving.openai_api import ApiError
from quiver.serving.rows import Route, ServedModel
from quiver.serving.sampling import SamplingParams
from quiver.serving.text import TextStream

log = logging.getLogger("quiver.serve")


class _Slots:
    """Requests accepted and not yet let go by the engine (touched on the event loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self) -> None:
        if self.used >= self.limit:
            raise ApiError(429, f"the server is busy ({self.limit} requests at once); retry "
                                "later", type="rate_limit_error", code="rate_limit_exceeded")
        self.used += 1

    def release(self) -> None:
        self.used -= 1


class _Job:
    """One accepted request: the engine's events, turned into text on the event loop."""

    def __init__(self, engine: Engine, slots: _Slots, ids: list[int], route: Route,
                 sampling: SamplingParams, stops: list[str], served: ServedModel) -> None:
        self.engine, self.slots = engine, slots
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.text = TextStream(served.tokenizer, stops)
        self.prompt_tokens, self.completion_tokens = len(ids), 0
        self.request = Request(ids, route, sampling, self._emit, stop_ids(served))
        slots.take()
        self._released = False
        try:
            engine.submit(self.request)
        except QuiverError:  # the engine is stopping: the request never got in
            self._release()
            raise

    def _emit(self, event: Event) -> None:  # on the engine thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: shutting down
            self.loop.call_soon_threadsafe(self._receive, event)

    def _receive(self, event: Event) -> None:
        if event.finish is not None:
            self._release()  # the engine holds nothing of this request any more
        self.events.put_nowait(event)

    def cancel(self) -> None:
        """Give up the request: its slot is free now, its row at the engine's next step."""
        self.engine.cancel(self.request)
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.slots.release()

    async def deltas(self) -> AsyncIterator[tuple[str, str | None]]:
        """(new text, None) while generating, then (last text, "stop" or "length")."""
        while True:
            event = await self.events.get()
            delta = ""
            if event.token is not None:
                self.completion_tokens += 1
                delta = self.text.add(event.token)
                if self.text.stopped:  # a stop string: the engine may stop this row
                    self.cancel()
                    yield delta, "stop"
                    return
            if event.finish == "error":
                raise ApiError(500, f"generation failed: {event.error}", type="server_error")
            if event.finish == "cancelled":
                raise ApiError(503, "the request was cancelled", type="server_error")
            if event.finish is not None:
                yield delta + self.text.flush(), event.finish
                return
            if delta:
                yield delta, None

    async def collect(self, http: HttpRequest) -> tuple[str, str]:
        """The whole completion; cancelled when the client disconnects first."""
        watcher = asyncio.create_task(self._watch(http))
        try:
            text, finish = "", "stop"
            async for delta, reason in self.deltas():
                text, finish = text + delta, reason or finish
            return text, finish
        finally:
            watcher.cancel()
            self.cancel()  # a no-op when it finished

    async def _watch(self, http: HttpRequest) -> None:
        while not await http.is_disconnected():
            await asyncio.sleep(0.1)
        self.cancel()

    def usage(self) -> dict:
        return api.usage(self.prompt_tokens, self.completion_tokens)


def create_app(served: ServedModel, config: ServeConfig | None = None,
               api_key: str | None = None) -> FastAPI:
    """The server's ASGI app; its engine starts and stops with the app's lifespan."""
    config = config or ServeConfig()
    engine = Engine(served, EngineConfig(max_batch=config.max_batch))
    slots = _Slots(config.max_concurrent)
    created = int(time.time())
    context_length = getattr(served.model.config, "max_position_embeddings", None)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="quiver", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(_Guard)

    def authorize(http: HttpRequest) -> None:
        if api_key is None:
            return
        given = http.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(),
                                                                 api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def job_for(body, ids: list[int], param: str, default_max: int) -> _Job:
        route = served.routes.get(body.model)
        if route is None:
            raise ApiError(404, f"the model {body.model!r} does not exist: GET /v1/models "
                                "lists them", param="model", code="model_not_found")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        max_tokens = max_tokens or min(default_max, config.max_tokens)
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        if max_tokens > config.max_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most "
                                f"{config.max_tokens}", param="max_tokens", code="invalid_value")
        if len(ids) > config.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server accepts at "
                                f"most {config.max_prompt_tokens}", param=param,
                           code="context_length_exceeded")
        if context_length and len(ids) + max_tokens > context_length:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) "
                                f"exceed the model's context of {context_length} tokens",
                           param=param, code="context_length_exceeded")
        sampling = SamplingParams(max_tokens, body.temperature, body.top_p, body.seed)
        return _Job(engine, slots, ids, route, sampling, body.stop_strings(), served)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped", **engine.load(),
                             "accepted": slots.used, "max_concurrent": slots.limit},
                            status_code=200 if alive else 503)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return api.models_list(list(served.routes), created)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(http: HttpRequest):
        body = api.parse(api.CompletionRequest, await _json(http, config.max_body_bytes))
        ids = served.tokenizer(body.prompt_text()).input_ids
        job = job_for(body, ids, "prompt", default_max=16)  # OpenAI's default for completions
        id = f"cmpl-{http.state.request_id}"
        if not body.stream:
            text, finish = await job.collect(http)
            return api.completion(id, body.model, text, finish, job.usage())

        async def chunks():
            async for delta, finish in job.deltas():
                yield api.completion(id, body.model, delta, finish, None, chunk=True)
            if body.include_usage():
                yield {**api.completion(id, body.model, "", None, job.usage(), chunk=True),
                       "choices": []}
        return _event_stream(job, chunks(), http.state.request_id)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(http: HttpRequest):
        body = api.parse(api.ChatRequest, await _json(http, config.max_body_bytes))
        try:
            ids = chat_ids(served.tokenizer, [m.as_dict() for m in body.messages])
        except QuiverError as err:
            raise ApiError(400, str(err), param="messages") from None
        except Exception as err:  # a template that refuses this conversation (roles, order)
            raise ApiError(400, f"the chat template refused these messages: {err}",
                           param="messages") from None
        job = job_for(body, ids, "messages", default_max=config.max_tokens)
        id = f"chatcmpl-{http.state.request_id}"
        if not body.stream:
            text, finish = await job.collect(http)
            return api.chat_completion(id, body.model, text, finish, job.usage())

        async def chunks():
            yield api.chat_chunk(id, body.model, {"role": "assistant", "content": ""}, None)
            async for delta, finish in job.deltas():
                yield api.chat_chunk(id, body.model, {"content": delta} if delta else {}, finish)
            if body.include_usage():
                yield api.chat_chunk(id, body.model, None, None, job.usage())
        return _event_stream(job, chunks(), http.state.request_id)

    app.state.engine, app.state.slots = engine, slots
    return app


def _event_stream(job: _Job, chunks: AsyncIterator[dict], request_id: str) -> StreamingResponse:
    """Server-sent events, OpenAI's way: `data: {chunk}` lines, then `data: [DONE]`. A client
    that disconnects cancels the stream, and with it the request."""

    async def events():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except ApiError as err:  # after the 200 went out: the error travels in the stream
            _log_failure(request_id, err)
            yield f"data: {json.dumps(err.body())}\n\n"
        finally:
            job.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _json(http: HttpRequest, limit: int) -> object:
    """The request's JSON body, read up to `limit` bytes.

    Raises:
        ApiError: 413 for a larger body, 400 for one that is not JSON (or says it is not).
    """
    kind = http.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(400, f"the request body must be JSON (Content-Type: application/json), "
                            f"not {kind}")
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes")
    try:
        return json.loads(body, parse_constant=_not_json)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as err:  # also the digit limit of Python's int and bad UTF-8
        reason = ("a number has too many digits" if "integer string conversion" in str(err)
                  else str(err))
        raise ApiError(400, f"the request body is not valid JSON: {reason}") from None


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not a JSON number")


async def _api_error(http: HttpRequest, err: ApiError) -> JSONResponse:
    _log_failure(http.state.request_id, err)
    return JSONResponse(err.body(), status_code=err.status)


async def _http_error(http: HttpRequest, err: HTTPException) -> JSONResponse:
    error = ApiError(err.status_code, str(err.detail),
                     "not_found_error" if err.status_code == 404 else "invalid_request_error")
    return JSONResponse(error.body(), status_code=err.status_code)


def _log_failure(request_id: str, err: ApiError) -> None:
    if err.status >= 500:
        log.error("request %s: %d %s", request_id, err.status, err.message)


class _Guard:
    """The app's outer layer: an id for every request (`x-request-id`), and no exception
    past it. One that escaped the routes is answered 500 in OpenAI's shape and logged in one
    line; not re-raising it keeps the client's keep-alive connection usable. A client that
    disconnected before its body arrived is logged in one line."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = uuid.uuid4().hex[:24]
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            log.info("request %s: the client disconnected before sending its body", request_id)
        except Exception as err:
            log.error("request %s: 500 %s: %s", request_id, err.__class__.__name__, err)
            if started:
                return
            body = json.dumps(ApiError(500, f"internal error: {err.__class__.__name__}",
                                       type="server_error").body()).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), header]})
            await send({"type": "http.response.body", "body": body})


def serve(served: ServedModel, config: ServeConfig, api_key: str | None = None) -> None:
    """Run the server until interrupted (Ctrl-C)."""
    import uvicorn

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s quiver serve %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    uvicorn.run(create_app(served, config, api_key), host=config.host, port=config.port,
                log_level="warning", access_log=False)

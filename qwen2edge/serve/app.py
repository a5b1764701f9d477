"""The FastAPI application: OpenAI routes, health, metrics, auth and error bodies."""

from __future__ import annotations

import asyncio
import hmac
import logging
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from ..runtime.bundle import Bundle
from ..runtime.generator import Generation, Generator
from ..runtime.sampling import SamplingParams
from .metrics import Metrics
from .schemas import APIError, ChatRequest, CompletionRequest, parse
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_BODY_BYTES = 8 * 2**20  # far above any prompt that fits a context; bounds memory per request
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServeSettings:
    """What `qwen2edge serve` was told."""

    model_name: str
    api_key: str | None = None
    max_concurrency: int = 8
    max_batch: int = 8
    max_queue: int = 64


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class _State:
    def __init__(self, bundle: Bundle, generator: Generator, settings: ServeSettings):
        self.bundle, self.generator, self.settings = bundle, generator, settings
        self.tokenizer = bundle.tokenizer
        self.metrics = Metrics()
        self.scheduler = Scheduler(generator, settings.max_concurrency, settings.max_batch, settings.max_queue,
                                   metrics=self.metrics)
        self.created = int(time.time())

    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not given:
            raise APIError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                           code="missing_api_key")
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    def check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise APIError(404, f"The model '{model}' does not exist: this server serves "
                           f"'{self.settings.model_name}' (see GET /v1/models)", param="model", code="model_not_found")

    def sampling(self, req: Any, prompt_len: int, max_tokens: int | None, param: str) -> SamplingParams:
        limit = self.bundle.max_seq_len
        if max_tokens is None:  # chat: up to the rest of the context, as OpenAI does
            max_tokens = limit - prompt_len
        if prompt_len + max_tokens > limit or max_tokens < 1:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{prompt_len + max(max_tokens, 1)} tokens ({prompt_len} in the {param}, "
                           f"{max(max_tokens, 1)} in the completion). Please reduce the length of the {param} "
                           "or the completion.", param=param, code="context_length_exceeded")
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                                  top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=req.seed,
                                  stop_strings=tuple(req.stop or ()))
        except InputError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None

    def submit(self, ids: list[int], params: SamplingParams) -> Job:
        job = Job(ids, params, asyncio.get_running_loop())
        try:
            self.scheduler.submit(job)
        except QueueFull as exc:
            raise APIError(429, f"the server is at capacity ({self.settings.max_queue} requests queued): retry "
                           f"after {exc.retry_after} s", type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down: retry on another replica", type_="server_error",
                           code="shutting_down") from None
        self.metrics.prompt_tokens.inc(len(ids))
        return job


def create_app(bundle: Bundle, generator: Generator, settings: ServeSettings,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """An ASGI app serving `generator` under the OpenAI API; the scheduler runs for the app's lifespan."""
    state = _State(bundle, generator, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        if on_ready:
            on_ready()
        try:
            yield
        finally:
            # The HTTP server has drained in-flight requests by now (or given up); cancel the rest.
            await anyio.to_thread.run_sync(state.scheduler.close)

    app = FastAPI(title="qwen2edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qwen2edge = state
    app.add_middleware(_CountRequests, metrics=state.metrics)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(ClientGone)
    async def _gone(_request: Request, _exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, /metrics counts it

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("qwen2edge.serve").error("unhandled error", exc_info=exc)
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        state.check_auth(request)
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> dict[str, Any]:
        state.check_auth(request)
        state.check_model(model)
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        state.check_auth(request)
        req: CompletionRequest = parse(CompletionRequest, await _json(request))
        state.check_model(req.model)
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            ids, prompt_text = await anyio.to_thread.run_sync(state.tokenizer.encode, prompt), prompt
        else:
            vocab = bundle.config.vocab_size
            bad = [i for i in prompt if not 0 <= i < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
            ids, prompt_text = list(prompt), state.tokenizer.decode(prompt, skip_special_tokens=False)
        if not ids:
            raise APIError(400, "prompt encodes to no tokens: give some text", param="prompt")
        params = state.sampling(req, len(ids), req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS, "prompt")
        job = state.submit(ids, params)
        shape = _Shape("cmpl", "text_completion", settings.model_name, chat=False)
        echo = prompt_text if req.echo else ""
        if req.stream:
            return _SSE(_stream(state, job, shape, req.include_usage, echo), media_type="text/event-stream")
        result = await _wait(state, job, request)
        return shape.full(echo + result.text, result, "/v1/completions", state, job)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        state.check_auth(request)
        req: ChatRequest = parse(ChatRequest, await _json(request))
        state.check_model(req.model)
        messages = req.template_messages()
        try:
            text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except InputError as exc:
            raise APIError(400, str(exc), param="messages") from None
        # Off the event loop: a long prompt must not stall the other clients' streams.
        ids = await anyio.to_thread.run_sync(state.tokenizer.encode, text)
        params = state.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, "messages")
        job = state.submit(ids, params)
        shape = _Shape("chatcmpl", "chat.completion", settings.model_name, chat=True)
        if req.stream:
            return _SSE(_stream(state, job, shape, req.include_usage, ""), media_type="text/event-stream")
        result = await _wait(state, job, request)
        return shape.full(result.text, result, "/v1/chat/completions", state, job)

    return app


# ---- helpers ------------------------------------------------------------------------------------

async def _json(request: Request) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:  # chunked uploads declare no length
            raise _too_large()
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc}): send a JSON object with "
                       "'Content-Type: application/json'", code="invalid_json") from None


def _too_large() -> APIError:
    return APIError(413, f"the request body exceeds {MAX_BODY_BYTES // 2**20} MiB; no prompt that fits the "
                    "context needs that much: shorten it", code="request_too_large")


def _model_card(state: _State) -> dict[str, Any]:
    return {"id": state.settings.model_name, "object": "model", "created": state.created, "owned_by": "qwen2edge",
            "max_model_len": state.bundle.max_seq_len}


def _finish_reason(result: Generation) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(job: Job, result: Generation) -> dict[str, int]:
    p, c = len(job.prompt_ids), len(result.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _record(state: _State, job: Job, result: Generation, endpoint: str) -> None:
    now = time.perf_counter()
    m = state.metrics
    m.latency.labels(endpoint).observe(now - job.submitted_at)
    m.ttft.observe((job.first_text_at or now) - job.submitted_at)


@dataclass
class _Shape:
    """Builds OpenAI response objects and stream chunks for one endpoint."""

    prefix: str
    object: str
    model: str
    chat: bool

    def __post_init__(self) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, result: Generation, endpoint: str, state: _State, job: Job) -> dict[str, Any]:
        _record(state, job, result, endpoint)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": _finish_reason(result)}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(result)}
        return {**self._base(self.object), "choices": [choice], "usage": _usage(job, result)}

    def chunk(self, text: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, job: Job, result: Generation) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": _usage(job, result)}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_of(payload: Any) -> APIError:
    if isinstance(payload, ShuttingDown):
        return APIError(503, "the server shut down before this request ran: retry", type_="server_error",
                        code="shutting_down")
    return APIError(500, f"generation failed: {payload}", type_="server_error")


async def _wait(state: _State, job: Job, request: Request) -> Generation:
    """Wait for a non-streaming job, cancelling it if the client goes away meanwhile."""
    next_check = time.monotonic() + DISCONNECT_POLL_S
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                kind, payload = "idle", None
            # Checked on a clock, not only when idle: text events keep arriving while a row generates.
            if time.monotonic() >= next_check:
                if await request.is_disconnected():
                    raise ClientGone()
                next_check = time.monotonic() + DISCONNECT_POLL_S
            if kind == "done":
                if payload.finish_reason == "cancelled":  # the server is shutting down
                    raise _error_of(ShuttingDown())
                return payload
            if kind == "error":
                raise _error_of(payload)
    finally:
        job.cancel()  # a no-op once the job has finished


async def _stream(state: _State, job: Job, shape: _Shape, include_usage: bool, echo: str) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    endpoint = "/v1/chat/completions" if shape.chat else "/v1/completions"
    try:
        if shape.chat:
            yield _sse(shape.chunk(None, role=True))
        elif echo:
            yield _sse(shape.chunk(echo))
        while True:
            kind, payload = await job.events.get()
            if kind == "text":
                yield _sse(shape.chunk(payload))
            elif kind == "done":
                _record(state, job, payload, endpoint)
                if payload.finish_reason == "cancelled":
                    yield _sse(_error_of(ShuttingDown()).body())
                else:
                    yield _sse(shape.chunk(None, finish=_finish_reason(payload)))
                    if include_usage:
                        yield _sse(shape.usage_chunk(job, payload))
                yield "data: [DONE]\n\n"
                return
            else:
                yield _sse(_error_of(payload).body())
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancel()  # the client went away (the stream was cancelled) or we are done: free the row


class _SSE(StreamingResponse):
    """A stream that is cancelled as soon as the client disconnects, whatever ASGI spec the server speaks
    (Starlette only listens for the disconnect below spec 2.4; above it, a dead client would otherwise go
    unnoticed until the generation ends)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async with anyio.create_task_group() as tg:
            async def run(fn: Callable[[], Any]) -> None:
                await fn()
                tg.cancel_scope.cancel()

            tg.start_soon(run, partial(self.stream_response, send))
            await run(partial(self.listen_for_disconnect, receive))


class _CountRequests:
    """ASGI middleware counting answered requests by route and status (streaming-safe, unlike
    BaseHTTPMiddleware, which would hide disconnects from the stream)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def _send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope.get("path", "")
        endpoint = "/v1/models" if path.startswith("/v1/models") else path if path in ROUTES else "other"
        try:
            await self.app(scope, receive, _send)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()

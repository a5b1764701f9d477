"""The FastAPI application: OpenAI routes, health, metrics, auth and error bodies."""

from __future__ import annotations

import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.bundle import Bundle
from ..runtime.generator import Generator
from .fanout import ClientGone, Fanout, JobFailed
from .metrics import Metrics
from .plan import Plan, chat_plan, completion_plan
from .responses import Answer, Shape, SSEResponse, error_of
from .schemas import APIError, ChatRequest, CompletionRequest, parse
from .scheduler import QueueFull, Scheduler, ShuttingDown
from .settings import ServeSettings, decode_speedups

MAX_BODY_BYTES = 8 * 2**20  # far above any prompt that fits a context; bounds memory per request
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _State:
    def __init__(self, bundle: Bundle, generator: Generator, settings: ServeSettings):
        self.bundle, self.generator, self.settings = bundle, generator, settings
        self.tokenizer = bundle.tokenizer
        self.metrics = Metrics()
        self.scheduler = Scheduler(generator, settings.max_concurrency, settings.max_batch, settings.max_queue,
                                   metrics=self.metrics, in_flight=settings.batching == "in-flight",
                                   **decode_speedups(bundle, generator, settings))
        self.created = int(time.time())
        # Longer text cannot fit the context whatever it encodes to: refused by its size, never tokenized.
        self.max_prompt_chars = self.tokenizer.max_text_chars(bundle.max_seq_len)

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

    def submit(self, fan: Fanout) -> Fanout:
        """Queue a request's jobs together (all or none)."""
        try:
            self.scheduler.submit_many(fan.jobs)
        except QueueFull as exc:
            raise APIError(429, f"the server is at capacity ({self.settings.max_queue} requests queued): retry "
                           f"after {exc.retry_after} s", type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down: retry on another replica", type_="server_error",
                           code="shutting_down") from None
        self.metrics.prompt_tokens.inc(sum(len(job.prompt_ids) for job in fan.jobs))
        return fan


def create_app(bundle: Bundle, generator: Generator, settings: ServeSettings,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """An ASGI app serving `generator` under the OpenAI API; the scheduler runs for the app's lifespan."""
    state = _State(bundle, generator, settings)
    app = FastAPI(title="qwen2edge", lifespan=_lifespan(state, on_ready), docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.qwen2edge = state
    app.add_middleware(_CountRequests, metrics=state.metrics)
    _add_error_handlers(app)
    _add_status_routes(app, state)
    _add_openai_routes(app, state)
    return app


def _lifespan(state: _State, on_ready: Callable[[], None] | None) -> Callable[[FastAPI], Any]:
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

    return lifespan


class _ErrorJSON(JSONResponse):
    """An error body may quote what the client sent, lone surrogates included: those leave as JSON's
    \\uXXXX escapes instead of failing to encode (which turned a 404 into a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error body."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return _ErrorJSON(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return _ErrorJSON(err.body(), status_code=exc.status_code)

    @app.exception_handler(ClientGone)
    async def _gone(_request: Request, _exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, /metrics counts it

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("qwen2edge.serve").error("unhandled error", exc_info=exc)
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")
        return _ErrorJSON(err.body(), status_code=500)


def _add_status_routes(app: FastAPI, state: _State) -> None:
    """/health, /metrics and the model list."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.settings.model_name}

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


def _add_openai_routes(app: FastAPI, state: _State) -> None:
    """/v1/completions and /v1/chat/completions: parse, tokenize, queue, then answer or stream."""

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        state.check_auth(request)
        req: CompletionRequest = parse(CompletionRequest, await _json(request))
        state.check_model(req.model)
        plan = await completion_plan(state, req)
        shape = Shape("cmpl", "text_completion", state.settings.model_name, chat=False)
        return await _answer(state, request, plan, shape, req)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        state.check_auth(request)
        req: ChatRequest = parse(ChatRequest, await _json(request))
        state.check_model(req.model)
        plan = await chat_plan(state, req)
        shape = Shape("chatcmpl", "chat.completion", state.settings.model_name, chat=True)
        return await _answer(state, request, plan, shape, req)


async def _answer(state: _State, request: Request, plan: Plan, shape: Shape, req: Any) -> Any:
    """Score the prompts when echo asks for their logprobs, then generate: the stream of chunks, or the whole
    response once every row is done."""
    answer = Answer(state, plan, shape, req.include_usage)
    jobs, prompt_lps = [], []
    try:
        if plan.score is not None:
            scoring = state.submit(Fanout.scoring(plan))
            await scoring.wait(request)
            jobs, prompt_lps = scoring.jobs, scoring.prompt_logprobs
        fan = state.submit(Fanout.generation(plan)) if plan.candidates else None
        if req.stream:
            return SSEResponse(answer.stream(fan, prompt_lps), media_type="text/event-stream")
        results = await fan.wait(request) if fan is not None else []
    except JobFailed as exc:
        raise error_of(exc) from None
    return answer.full(results, prompt_lps, fan.jobs if fan is not None else jobs)


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

"""OpenAI response bodies and server-sent event streams for one generation job."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from ..runtime.generator import Generation
from .metrics import Metrics
from .schemas import APIError
from .scheduler import Job, ShuttingDown

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _finish_reason(result: Generation) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(job: Job, result: Generation) -> dict[str, int]:
    p, c = len(job.prompt_ids), len(result.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def record(metrics: Metrics, job: Job, result: Generation, endpoint: str) -> None:
    """Latency and time-to-first-token of a finished request."""
    now = time.perf_counter()
    m = metrics
    m.latency.labels(endpoint).observe(now - job.submitted_at)
    m.ttft.observe((job.first_text_at or now) - job.submitted_at)


@dataclass
class Shape:
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

    def full(self, text: str, result: Generation, endpoint: str, metrics: Metrics, job: Job) -> dict[str, Any]:
        record(metrics, job, result, endpoint)
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


async def wait_result(job: Job, request: Request) -> Generation:
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


async def stream_events(metrics: Metrics, job: Job, shape: Shape, include_usage: bool, echo: str) -> AsyncIterator[str]:
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
                record(metrics, job, payload, endpoint)
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


class SSEResponse(StreamingResponse):
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

"""OpenAI response bodies and server-sent event streams for one request's generations.

Choices are numbered as OpenAI numbers them: choice i of prompt p is index p * n + i. With best_of > n
the n candidates of highest mean token log-probability are returned, best first (not streamable).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable

import anyio
from fastapi.responses import StreamingResponse

from ..runtime.generator import Generation
from ..runtime.logits import TokenLogprob
from . import tools
from .fanout import Fanout, JobFailed
from .logprobs import CompletionLogprobs, chat_content
from .metrics import Metrics
from .plan import Plan
from .schemas import APIError
from .scheduler import Job, ShuttingDown

PromptLogprobs = list[list[TokenLogprob | None]]


def _finish_reason(result: Generation | None) -> str:
    return "stop" if result is not None and result.finish_reason == "stop" else "length"


def record(metrics: Metrics, jobs: list[Job], endpoint: str) -> None:
    """Latency and time-to-first-token of a finished request (over all its rows)."""
    if not jobs:
        return
    now = time.perf_counter()
    start = min(job.submitted_at for job in jobs)
    first = min((job.first_text_at for job in jobs if job.first_text_at is not None), default=now)
    metrics.latency.labels(endpoint).observe(now - start)
    metrics.ttft.observe(first - start)


def error_of(payload: Any) -> APIError:
    if isinstance(payload, JobFailed):
        payload = payload.payload
    if isinstance(payload, ShuttingDown):
        return APIError(503, "the server shut down before this request ran: retry", type_="server_error",
                        code="shutting_down")
    return APIError(500, f"generation failed: {payload}", type_="server_error")


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chat_finish(result: Generation, calls: list[dict[str, Any]]) -> str:
    """"tool_calls" when the output ended (not cut by max_tokens) after calling tools."""
    reason = _finish_reason(result)
    return "tool_calls" if calls and reason == "stop" else reason


def _mean_logprob(result: Generation) -> float:
    lps = result.logprobs or []
    return sum(e.logprob for e in lps) / len(lps) if lps else 0.0


@dataclass
class Shape:
    """One response's id and object names."""

    prefix: str
    object: str
    model: str
    chat: bool

    def __post_init__(self) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.endpoint = "/v1/chat/completions" if self.chat else "/v1/completions"
        self.chunk_object = "chat.completion.chunk" if self.chat else "text_completion"

    def body(self, obj: str, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, **fields}


class Answer:
    """Builds one request's answer from its plan and its rows' results, whole or streamed."""

    def __init__(self, state: Any, plan: Plan, shape: Shape, include_usage: bool):
        self.state, self.plan, self.shape, self.include_usage = state, plan, shape, include_usage
        self.tok = state.tokenizer

    def usage(self, results: list[Generation]) -> dict[str, int]:
        p = sum(len(ids) for ids in self.plan.prompts)
        c = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def index(self, candidate: int) -> int:
        c = self.plan.candidates[candidate]
        return c.prompt * self.plan.n + c.choice

    # ---- whole responses ---------------------------------------------------------------------------

    def full(self, results: list[Generation], prompt_lps: PromptLogprobs, jobs: list[Job]) -> dict[str, Any]:
        record(self.state.metrics, jobs, self.shape.endpoint)
        choices = self._chat_choices(results) if self.shape.chat else self._completion_choices(results, prompt_lps)
        return self.shape.body(self.shape.object, choices=choices, usage=self.usage(results))

    def _completion_choices(self, results: list[Generation], prompt_lps: PromptLogprobs) -> list[dict[str, Any]]:
        plan, k, choices = self.plan, self.plan.best_of, []
        for p, ids in enumerate(plan.prompts):
            picked: list[Generation | None] = [None] * plan.n
            if plan.generate:
                picked = list(results[p * k:(p + 1) * k])
                if k > plan.n:
                    picked = sorted(picked, key=_mean_logprob, reverse=True)[:plan.n]
            for i, res in enumerate(picked):
                logprobs = None
                if plan.logprobs is not None:
                    lp = CompletionLogprobs(self.tok)
                    if plan.texts[p]:
                        lp.add(ids, prompt_lps[p])
                    if res is not None:
                        lp.add(res.token_ids, res.logprobs or [])
                    logprobs = lp.value
                text = plan.texts[p] + (res.text if res is not None else "")
                choices.append({"index": p * plan.n + i, "text": text, "logprobs": logprobs,
                                "finish_reason": _finish_reason(res)})
        return choices

    def _chat_choices(self, results: list[Generation]) -> list[dict[str, Any]]:
        choices = []
        for i, res in enumerate(results):
            content, calls = tools.parse(res.text) if self.plan.tools else (res.text, [])
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            logprobs = None
            if self.plan.logprobs is not None:
                logprobs = {"content": chat_content(self.tok, res.logprobs or []), "refusal": None}
            choices.append({"index": self.index(i), "message": message, "logprobs": logprobs,
                            "finish_reason": _chat_finish(res, calls)})
        return choices

    # ---- streams -------------------------------------------------------------------------------------

    def _chunk(self, index: int, finish: str | None = None, logprobs: Any = None, **fields: Any) -> str:
        key = "delta" if self.shape.chat else "text"
        choice = {"index": index, key: fields.get(key, {} if self.shape.chat else ""), "logprobs": logprobs,
                  "finish_reason": finish}
        return _sse(self.shape.body(self.shape.chunk_object, choices=[choice]))

    async def stream(self, fan: Fanout | None, prompt_lps: PromptLogprobs) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        streams = [_ChoiceStream(self, c) for c in range(len(self.plan.candidates))]
        try:
            for text in self._opening(prompt_lps, streams):
                yield text
            if fan is not None:
                async for j, kind, payload in fan.events():
                    if kind == "error" or (kind == "done" and payload.finish_reason == "cancelled"):
                        yield _sse(error_of(payload if kind == "error" else ShuttingDown()).body())
                        yield "data: [DONE]\n\n"
                        return
                    if kind == "logprobs":  # the records of the tokens behind the next text event
                        streams[j].pending += payload
                        continue
                    for text in (streams[j].text(payload) if kind == "text" else streams[j].done(payload)):
                        yield text
                record(self.state.metrics, fan.jobs, self.shape.endpoint)
            if self.include_usage:
                results = [r for r in (fan.results if fan is not None else []) if r is not None]
                yield _sse(self.shape.body(self.shape.chunk_object, choices=[], usage=self.usage(results)))
            yield "data: [DONE]\n\n"
        finally:
            if fan is not None:
                fan.cancel()

    def _opening(self, prompt_lps: PromptLogprobs, streams: list["_ChoiceStream"]) -> list[str]:
        """The first chunk of every choice: the role (chat) or the echoed prompt; prompt-only requests end
        here."""
        plan, out = self.plan, []
        for p, ids in enumerate(plan.prompts):
            for i in range(plan.n):
                index = p * plan.n + i
                if self.shape.chat:
                    out.append(self._chunk(index, delta={"role": "assistant", "content": ""}))
                    continue
                lp = streams[index].lp if plan.generate else (CompletionLogprobs(self.tok)
                                                               if plan.logprobs is not None else None)
                frag = lp.add(ids, prompt_lps[p]) if lp is not None and plan.texts[p] and prompt_lps else None
                if plan.texts[p]:
                    out.append(self._chunk(index, logprobs=frag, text=plan.texts[p]))
                if not plan.generate:
                    out.append(self._chunk(index, finish="length"))
        return out


class _ChoiceStream:
    """One choice's chunks: text (or content and tool-call deltas) with its tokens' logprobs."""

    def __init__(self, answer: Answer, candidate: int):
        self.a, self.index = answer, answer.index(candidate)
        wants = answer.plan.logprobs is not None
        self.lp = CompletionLogprobs(answer.tok) if wants and not answer.shape.chat else None
        self.chat_lp = wants and answer.shape.chat
        self.tools = tools.ToolStream() if answer.plan.tools else None
        self.sent = 0  # logprob entries already sent
        self.pending: list[TokenLogprob] = []  # entries of the next text event
        self.held: list[TokenLogprob] = []  # chat: entries waiting for a delta to ride on

    def text(self, delta: str) -> list[str]:
        entries, self.pending = self.pending, []
        self.sent += len(entries)
        if not self.a.shape.chat:
            frag = self.lp.add([e.token for e in entries], entries) if self.lp is not None else None
            return [self.a._chunk(self.index, logprobs=frag, text=delta)]
        return self._deltas(self.tools.feed(delta) if self.tools else [{"content": delta}], entries)

    def done(self, result: Generation) -> list[str]:
        rest = (result.logprobs or [])[self.sent:]
        reason = _finish_reason(result)
        if not self.a.shape.chat:
            frag = self.lp.add([e.token for e in rest], rest) if self.lp is not None and rest else None
            return [self.a._chunk(self.index, finish=reason, logprobs=frag)]
        out = self._deltas(self.tools.close() if self.tools else [], rest)
        if self.held:
            out.append(self._chat(self.held))
        if self.tools is not None and self.tools.calls and reason == "stop":
            reason = "tool_calls"
        return out + [self.a._chunk(self.index, finish=reason)]

    def _deltas(self, deltas: list[dict[str, Any]], entries: list[TokenLogprob]) -> list[str]:
        self.held += entries
        out = []
        for delta in deltas:
            out.append(self._chat(self.held, delta))
            self.held = []
        return out

    def _chat(self, entries: list[TokenLogprob], delta: dict[str, Any] | None = None) -> str:
        logprobs = {"content": chat_content(self.a.tok, entries), "refusal": None} if self.chat_lp else None
        return self.a._chunk(self.index, logprobs=logprobs, delta=delta or {})


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

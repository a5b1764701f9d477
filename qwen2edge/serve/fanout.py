"""The scheduler jobs answering one request, and their events merged into one stream.

A request with several prompts or choices is several jobs (rows), queued together; each job's events
are tagged with the job's index and land in one asyncio queue, so a response waits on, or streams
from, a single place. When the client goes away, or one job fails, every job of the request is
cancelled.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from fastapi import Request

from ..runtime.generator import Generation
from ..runtime.logits import TokenLogprob
from ..runtime.sampling import SamplingParams
from .plan import Plan
from .scheduler import Job, ShuttingDown

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class JobFailed(Exception):
    """A job of the request ended in an error (payload: the scheduler's exception)."""

    def __init__(self, payload: Any):
        super().__init__(str(payload))
        self.payload = payload


class _Tagged:
    """A job's event sink: puts (index, kind, payload) on the request's shared queue."""

    def __init__(self, index: int, queue: asyncio.Queue):
        self.index, self.queue = index, queue

    def put_nowait(self, event: tuple[str, Any]) -> None:
        self.queue.put_nowait((self.index, *event))


class Fanout:
    """Jobs of one request sharing one event queue: `wait` for all results, or iterate `events`."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.queue: asyncio.Queue = asyncio.Queue()
        for i, job in enumerate(jobs):
            job.events = _Tagged(i, self.queue)  # type: ignore[assignment]
        self.results: list[Generation | None] = [None] * len(jobs)

    @classmethod
    def generation(cls, plan: Plan) -> "Fanout":
        loop = asyncio.get_running_loop()
        return cls([Job(plan.prompts[c.prompt], c.params, loop) for c in plan.candidates])

    @classmethod
    def scoring(cls, plan: Plan) -> "Fanout":
        """One prompt-only job per prompt (echo + logprobs)."""
        loop = asyncio.get_running_loop()
        return cls([Job(ids, SamplingParams(max_new_tokens=1), loop, score_prompt=plan.score, generate=False)
                    for ids in plan.prompts])

    @property
    def prompt_logprobs(self) -> list[list[TokenLogprob | None]]:
        return [job.prompt_logprobs or [] for job in self.jobs]

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def wait(self, request: Request) -> list[Generation]:
        """Every job's result; cancels them all if the client goes away or one fails."""
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            pending = len(self.jobs)
            while pending:
                try:
                    index, kind, payload = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    index, kind, payload = -1, "idle", None
                # Checked on a clock, not only when idle: text events keep arriving while rows generate.
                if time.monotonic() >= next_check:
                    if await request.is_disconnected():
                        raise ClientGone()
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                if kind == "done":
                    if payload.finish_reason == "cancelled":  # the server is shutting down
                        raise JobFailed(ShuttingDown())
                    self.results[index] = payload
                    pending -= 1
                elif kind == "error":
                    raise JobFailed(payload)
            return list(self.results)  # type: ignore[arg-type]
        finally:
            self.cancel()  # a no-op for finished jobs

    async def events(self) -> AsyncIterator[tuple[int, str, Any]]:
        """(job index, kind, payload) until every job is done; stops after the first error."""
        pending = len(self.jobs)
        try:
            while pending:
                index, kind, payload = await self.queue.get()
                if kind == "done":
                    self.results[index] = payload
                    pending -= 1
                yield index, kind, payload
                if kind == "error":
                    return
        finally:
            self.cancel()  # the client went away (the stream was cancelled) or we are done: free the rows

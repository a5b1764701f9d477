"""Owns the generator: a bounded queue of requests, drained by worker threads.

Each worker owns an in-flight batch of up to `max_batch` rows (runtime.continuous): between two
decode steps it retires finished rows and admits waiting requests into the free rows, so a request
waits for a free row, not for a whole batch to end. Every row has its own cache slots, sampler and
stop state, so a request's output does not depend on what it was batched with. Backends without
in-flight batching (TensorRT's device cache) run static right-padded batches instead: a worker takes
up to `max_batch` requests and runs them to the end. Workers share the backend only when it says
its `infer` is thread-safe; otherwise one worker runs.

Events for a request (text deltas, then its result) are handed to the asyncio loop that submitted it.
When the request asked for log-probabilities, a "logprobs" event with the new tokens' records comes
right before each text event.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InputError
from ..runtime.continuous import InFlightBatch
from ..runtime.generator import Generation, Generator, Row
from ..runtime.logits import TokenLogprob
from ..runtime.prefix_cache import PrefixCache
from ..runtime.sampling import SamplingParams
from ..runtime.scoring import prompt_logprobs
from .metrics import Metrics


DEFAULT_MAX_BATCH = 8


def resolve_max_batch(requested: int | None, backend_limit: int | None) -> int:
    """Rows per batch for a backend that may cap them (a TensorRT engine's --max-batch): unset means
    DEFAULT_MAX_BATCH or the cap if smaller; an explicit value above the cap is refused at start-up,
    rather than failing every request of every batch larger than the engine accepts."""
    if requested is None:
        return min(DEFAULT_MAX_BATCH, backend_limit or DEFAULT_MAX_BATCH)
    if backend_limit is not None and requested > backend_limit:
        raise InputError(f"{{opt:max_batch}} {requested} exceeds the engine's largest batch ({backend_limit}): pass "
                         f"{{opt:max_batch}} {backend_limit} or rebuild with `qwen2edge build-engine BUNDLE "
                         f"--max-batch {requested}`")
    return requested


class QueueFull(Exception):
    """The wait queue is at --max-queue; the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining and takes no new requests."""


@dataclass
class Job:
    """One request's generation: inputs, a cancel flag, and the event queue its handler reads."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_text_at: float | None = None
    score_prompt: int | None = None  # echo logprobs: alternatives per prompt position (None: not asked)
    generate: bool = True  # False: score the prompt only (max_tokens 0)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # set before the job's first event
    result: Generation | None = None  # the row's result while it generates
    _logprobs_sent: int = 0

    def cancel(self) -> None:
        """Stop generating for this request (client gone); its batch row stops at the next step."""
        self.cancelled.set()

    def _post(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop closed: nobody is listening any more
            pass


class Scheduler:
    """Bounded admission + batched execution over one Generator."""

    def __init__(self, generator: Generator, max_concurrency: int = 8, max_batch: int | None = None,
                 max_queue: int = 64, batch_wait_s: float = 0.005, metrics: Metrics | None = None,
                 in_flight: bool = True, speculator_factory: Callable[[], Any] | None = None,
                 prefix_cache: PrefixCache | None = None, prefill_chunk: int = 0):
        self.generator = generator
        # Speculation works in both batching modes (a speculator per worker); the prefix cache (shared)
        # and chunked prefill need in-flight batching.
        self.speculator_factory = speculator_factory
        self.prefix_cache = prefix_cache
        self.prefill_chunk = prefill_chunk
        self._reused_seen = 0
        self.in_flight = in_flight and getattr(generator.backend, "in_flight_batching", False)
        limit = getattr(generator.backend, "max_batch", None)  # e.g. the TensorRT engine's --max-batch
        self.max_batch = max(1, min(resolve_max_batch(max_batch, limit), max_concurrency))
        workers = math.ceil(max_concurrency / self.max_batch)
        self.workers = workers if getattr(generator.backend, "thread_safe", False) else 1
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics or Metrics()
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False  # no new jobs
        self._abort = False  # cancel running rows too
        self._running = 0
        self._avg_latency = 1.0
        self._threads = [threading.Thread(target=self._worker, name=f"qwen2edge-gen-{i}", daemon=True)
                         for i in range(self.workers)]

    @property
    def capacity(self) -> int:
        """Requests that can generate at the same time."""
        return self.workers * self.max_batch

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def submit(self, job: Job) -> None:
        """Queue a job; raise QueueFull when --max-queue requests already wait, ShuttingDown when closing."""
        self.submit_many([job])

    def submit_many(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request (its prompts and choices) all or none, so they share batches."""
        with self._cond:
            if self._closing:
                raise ShuttingDown()
            self._drop_cancelled()
            # Admitted work is bounded by the slots plus the queue; --max-queue 0 still admits
            # requests while slots are free.
            if len(self._pending) + self._running + len(jobs) > self.capacity + self.max_queue:
                # Roughly when a slot frees up: the queue ahead drains at `capacity` per average latency.
                waves = (len(self._pending) + self._running + len(jobs)) / self.capacity
                raise QueueFull(max(1, math.ceil(waves * self._avg_latency)))
            self._pending.extend(jobs)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify(len(jobs))

    def close(self, timeout: float = 10.0) -> None:
        """Cancel whatever still waits or runs and join the workers (the HTTP layer drains first)."""
        self.abort()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))

    def abort(self) -> None:
        """Take no new jobs and cancel what waits or runs, without waiting: every job ends with an error
        (waiting ones) or as cancelled (running rows, at their next step)."""
        with self._cond:
            self._closing = self._abort = True
            for job in self._pending:
                job.cancel()
                job._post("error", ShuttingDown())
            self._pending.clear()
            self.metrics.queue_depth.set(0)
            self._cond.notify_all()

    # ---- worker side ---------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        if any(j.cancelled.is_set() for j in self._pending):
            self._pending = collections.deque(j for j in self._pending if not j.cancelled.is_set())
            self.metrics.queue_depth.set(len(self._pending))

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._pending or self._closing:
                    break
                self._cond.wait()
            if self._closing and not self._pending:
                return None
            return self._pop(self.max_batch, idle=True)

    def _pop(self, room: int, idle: bool) -> list[Job]:
        """Up to `room` waiting jobs, with the lock held. An idle worker first waits a few ms: requests
        of a burst arrive a few ms apart, and the wait lets them share one batch (one prefill)."""
        if idle and len(self._pending) < room and self.batch_wait_s > 0:
            self._cond.wait(self.batch_wait_s)
            self._drop_cancelled()
        jobs = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        self._running += len(jobs)
        self.metrics.queue_depth.set(len(self._pending))
        return jobs

    def _worker(self) -> None:
        speculator = self.speculator_factory() if self.speculator_factory else None
        if self.in_flight:
            self._worker_in_flight(speculator)
            return
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._run(batch, speculator)

    # ---- in-flight batching ----------------------------------------------------------------------

    def _take_new(self, batch: InFlightBatch) -> list[Job] | None:
        """Waiting jobs for the batch's free rows: [] to keep stepping, None when closed and idle."""
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._pending and batch.free:
                    break
                if len(batch):
                    return []
                if self._closing:
                    return None
                self._cond.wait()
            return self._pop(batch.free, idle=not len(batch))

    def _worker_in_flight(self, speculator: Any) -> None:
        batch = InFlightBatch(self.generator, self.max_batch, speculator=speculator, prefix_cache=self.prefix_cache,
                              prefill_chunk=self.prefill_chunk)
        live: dict[int, Job] = {}  # id(job) -> job, for the rows in `batch`

        def on_finish(key: int, result: Generation) -> None:
            self._done(live.pop(key), result)

        while True:
            jobs = self._take_new(batch)
            if jobs is None:
                return
            self._start(jobs)
            rows = []
            for job in jobs:
                row = self._row(job)
                if row is not None:
                    rows.append((id(job), row))
                    live[id(job)] = job
            try:
                batch.admit(rows)
                self._count_reuse()
                self.metrics.batch_size.observe(len(batch))
                batch.step(lambda key, delta: self._text(live[key], delta), on_finish,
                           lambda key: self._abort or live[key].cancelled.is_set())
            except Exception as exc:  # a backend failure fails the batch's requests (new ones too), not the server
                batch.abandon()
                for job in live.values():
                    self._fail(job, exc)
                live.clear()

    def _count_reuse(self) -> None:
        """Move the prefix cache's reused-token count (shared by the workers) into the metrics."""
        if self.prefix_cache is None:
            return
        with self._cond:
            delta, self._reused_seen = self.prefix_cache.reused_tokens - self._reused_seen, self.prefix_cache.reused_tokens
        self.metrics.prefix_reused.inc(delta)

    def _run(self, jobs: list[Job], speculator: Any = None) -> None:
        self._start(jobs)
        made = [(job, self._row(job)) for job in jobs]
        batch = [job for job, row in made if row is not None]
        if not batch:
            return
        self.metrics.batch_size.observe(len(batch))
        open_rows = set(range(len(batch)))

        def on_finish(r: int, result: Generation) -> None:
            open_rows.discard(r)
            self._done(batch[r], result)

        try:
            self.generator.run_rows([row for _, row in made if row is not None],
                                    on_text=lambda r, delta: self._text(batch[r], delta),
                                    should_stop=lambda r: self._abort or batch[r].cancelled.is_set(),
                                    on_finish=on_finish, speculator=speculator)
        except Exception as exc:  # a backend failure fails this batch's requests, not the server
            for r in sorted(open_rows):
                self._fail(batch[r], exc)

    # ---- per-job bookkeeping, shared by both workers ----------------------------------------------

    def _start(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        self.metrics.running.inc(len(jobs))
        for job in jobs:
            job.started_at = now
            self.metrics.queue_wait.observe(now - job.submitted_at)

    def _row(self, job: Job) -> Row | None:
        """The job's row, after scoring its prompt when asked; None when the job is complete or failed
        (a prompt-only job ends here)."""
        try:
            if job.score_prompt is not None:
                job.prompt_logprobs = prompt_logprobs(self.generator, job.prompt_ids, job.score_prompt)
            if not job.generate:
                self._done(job, Generation(prompt_ids=list(job.prompt_ids)))
                return None
            row = self.generator.new_row(job.prompt_ids, job.params)
        except Exception as exc:  # checked at the HTTP layer already; never let one request stop the worker
            self._fail(job, exc)
            return None
        job.result = row.result
        return row

    @staticmethod
    def _text(job: Job, delta: str) -> None:
        if job.first_text_at is None:
            job.first_text_at = time.perf_counter()
        logprobs = job.result.logprobs if job.result is not None else None
        if logprobs is not None and len(logprobs) > job._logprobs_sent:  # snapshot on the worker: the list grows
            new: list[TokenLogprob] = logprobs[job._logprobs_sent:]
            job._logprobs_sent = len(logprobs)
            job._post("logprobs", new)
        job._post("text", delta)

    def _done(self, job: Job, result: Generation) -> None:
        self._release(1, time.perf_counter() - job.submitted_at)
        self.metrics.finished.labels(result.finish_reason).inc()
        self.metrics.generation_tokens.inc(len(result.token_ids))  # cancelled rows' tokens were computed too
        self.metrics.draft_tokens.labels("drafted").inc(result.drafted)
        self.metrics.draft_tokens.labels("accepted").inc(result.accepted)
        job._post("done", result)

    def _fail(self, job: Job, exc: Exception) -> None:
        self._release(1, None)
        self.metrics.finished.labels("error").inc()
        job._post("error", exc)

    def _release(self, rows: int, latency: float | None) -> None:
        self.metrics.running.dec(rows)
        with self._cond:
            self._running -= rows
            if latency is not None:
                self._avg_latency = 0.8 * self._avg_latency + 0.2 * latency

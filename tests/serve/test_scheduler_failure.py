"""A backend that fails mid-generation fails exactly the requests it was running, frees their slots, and
the worker goes on serving: both batching modes, over a real ONNX Runtime session with a fault injected."""

import asyncio

import pytest

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.sampling import SamplingParams
from qwen2edge.serve.scheduler import Job, Scheduler

LONG = SamplingParams(max_new_tokens=40, stop_token_ids=(-1,))


class FailOnce:
    """Wraps the real backend's step: raises on its `fail_at`-th call, then works normally again."""

    def __init__(self, backend, fail_at: int):
        self.backend, self.fail_at, self.calls = backend, fail_at, 0
        self.real_step = backend.step
        backend.step = self.step

    def step(self, cache, feed, write_pos):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected backend failure")
        return self.real_step(cache, feed, write_pos)


async def _outcome(job: Job) -> str:
    while True:
        kind, payload = await asyncio.wait_for(job.events.get(), timeout=60)
        if kind == "done":
            return payload.finish_reason
        if kind == "error":
            return f"error: {payload}"


@pytest.mark.parametrize("in_flight", [True, False])
def test_a_failing_step_fails_its_requests_and_the_worker_goes_on(in_flight, tiny_bundle_factory):
    gen = Bundle.open(tiny_bundle_factory("gqa")[1]).generator()
    FailOnce(gen.backend, fail_at=5)  # prefill + a few decode steps of the first two requests
    sched = Scheduler(gen, max_concurrency=4, max_batch=4, batch_wait_s=0.05, in_flight=in_flight)
    sched.start()

    async def run():
        loop = asyncio.get_running_loop()
        first = [Job([40, 1079, 264], LONG, loop), Job([3838, 11], LONG, loop)]
        for job in first:
            sched.submit(job)
        failed = await asyncio.gather(*(_outcome(j) for j in first))
        later = Job([9707, 11, 1879], SamplingParams(max_new_tokens=6, stop_token_ids=(-1,)), loop)
        sched.submit(later)
        return failed, await _outcome(later)

    try:
        failed, later = asyncio.run(run())
    finally:
        sched.close()
    assert failed == ["error: injected backend failure"] * 2
    assert later == "length"  # the same worker served the next request
    m = sched.metrics
    assert m.running._value.get() == 0 and m.finished.labels("error")._value.get() == 2
    assert sched._running == 0  # both slots were given back

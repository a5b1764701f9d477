"""A backend with a batch limit (a TensorRT engine built with --max-batch N) caps the scheduler's batches:
serve's default follows it, an explicit larger --max-batch is refused at start-up in one line, and the
scheduler never hands the backend more rows than it accepts. Real ONNX Runtime generator; the limit is set
on it the way TrtBackend sets it from its engine's profiles."""

import asyncio

import pytest

from qwen2edge.errors import InputError, cli_spelling
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.sampling import SamplingParams
from qwen2edge.serve.scheduler import DEFAULT_MAX_BATCH, Job, Scheduler, resolve_max_batch


def test_max_batch_follows_the_backend_limit():
    assert resolve_max_batch(None, None) == DEFAULT_MAX_BATCH == 8
    assert resolve_max_batch(None, 1) == 1  # build-engine's default engine: serve batches of one
    assert resolve_max_batch(None, 32) == 8
    assert resolve_max_batch(4, None) == 4 and resolve_max_batch(4, 4) == 4
    with pytest.raises(InputError) as e:
        resolve_max_batch(8, 1)
    msg = e.value.render(cli_spelling)
    assert "\n" not in msg
    assert msg.startswith("--max-batch 8 exceeds the engine's largest batch (1): pass --max-batch 1")
    assert "qwen2edge build-engine BUNDLE --max-batch 8" in msg
    assert e.value.options == ["max_batch", "max_batch"]  # an HTTP-side caller spells them as fields


@pytest.mark.parametrize("in_flight", [True, False])
def test_the_scheduler_never_exceeds_the_backend_limit(in_flight, tiny_bundle_factory):
    gen = Bundle.open(tiny_bundle_factory("gqa")[1]).generator()
    gen.backend.max_batch = 2
    rows_seen = []
    real_step = gen.backend.step

    def step(cache, feed, write_pos):
        rows_seen.append(len(write_pos))
        return real_step(cache, feed, write_pos)

    gen.backend.step = step
    with pytest.raises(InputError, match="exceeds the engine's largest batch"):
        Scheduler(gen, max_concurrency=8, max_batch=8, in_flight=in_flight)
    sched = Scheduler(gen, max_concurrency=8, batch_wait_s=0.05, in_flight=in_flight)  # max_batch unset
    assert sched.max_batch == 2
    sched.start()
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(-1,))

    async def run():
        loop = asyncio.get_running_loop()
        jobs = [Job([40 + i, 1079, 264], params, loop) for i in range(5)]
        for job in jobs:
            sched.submit(job)
        out = []
        for job in jobs:
            while True:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout=60)
                if kind in ("done", "error"):
                    out.append((kind, getattr(payload, "finish_reason", str(payload))))
                    break
        return out

    try:
        results = asyncio.run(run())
    finally:
        sched.close()
    assert results == [("done", "length")] * 5
    assert max(rows_seen) == 2  # batched up to the limit, never beyond it

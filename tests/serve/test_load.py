"""Under load: concurrent streams equal single requests, a full queue answers 429, a client that leaves
frees its slot, and SIGTERM drains then exits 0."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .conftest import API_KEY, LONG_ANSWER, ServerProcess

PROMPTS = [f"Story number {i}: once upon a time in {city}," for i, city in enumerate(
    ["Paris", "Lima", "Oslo", "Cairo", "Quito", "Delhi", "Perth", "Accra", "Tunis", "Hanoi", "Sofia", "Dakar",
     "Minsk", "Doha", "Riga", "Bern"])]


def _client(server, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300)


def _stream_text(client, model: str, prompt: str, max_tokens: int, barrier: threading.Barrier | None = None):
    if barrier is not None:
        barrier.wait()
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stream=True))
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


def test_16_concurrent_streams_equal_their_single_results(tiny_server):
    client = _client(tiny_server)
    lengths = [6 + i % 5 * 3 for i in range(16)]  # different lengths end rows at different steps
    singles = [client.completions.create(model=tiny_server.model, prompt=p, max_tokens=n, temperature=0)
               for p, n in zip(PROMPTS, lengths)]
    before = tiny_server.metrics()
    barrier = threading.Barrier(16)
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_stream_text, client, tiny_server.model, p, n, barrier)
                   for p, n in zip(PROMPTS, lengths)]
        streamed = [f.result(timeout=300) for f in futures]
    for single, (text, reason) in zip(singles, streamed):
        assert text == single.choices[0].text and reason == single.choices[0].finish_reason
    after = tiny_server.metrics()
    # They really shared batches: decode steps ran several rows at once on average.
    steps = after["qwen2edge_batch_size_count"] - before["qwen2edge_batch_size_count"]
    rows = after["qwen2edge_batch_size_sum"] - before["qwen2edge_batch_size_sum"]
    assert steps > 0 and rows / steps > 2, (rows, steps)
    assert after["qwen2edge_requests_running"] == 0 and after["qwen2edge_queue_depth"] == 0


@pytest.mark.parametrize("batching", ["in-flight", "static"])
def test_a_short_request_joins_a_running_batch(batching, long_bundle):
    """One worker with 4 rows busy on a long stream: in-flight batching answers a short request while
    the long one still runs; a static batch makes it wait for the long one to end."""
    server = ServerProcess(long_bundle, "--max-concurrency", "4", "--max-batch", "4", "--batching", batching)
    try:
        http, resp = _open_stream(server, LONG_ANSWER)
        lines = resp.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
        next(lines)  # the long row is generating
        out = _client(server).completions.create(model=server.model, prompt="short", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens >= 1
        still_running = server.metrics()["qwen2edge_requests_running"] == 1
        assert still_running is (batching == "in-flight")
        resp.close(); http.close()
    finally:
        assert server.stop() == 0, server.log()


def _wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _open_stream(server, max_tokens: int):
    """A streaming request kept open by the caller; returns (httpx client, response) after the first token."""
    http = httpx.Client(timeout=300)
    req = http.build_request("POST", f"{server.url}/v1/completions", json={
        "model": server.model, "prompt": "Tell me everything", "max_tokens": max_tokens, "temperature": 0,
        "stream": True})
    resp = http.send(req, stream=True)
    assert resp.status_code == 200
    return http, resp


def test_full_queue_answers_429_with_retry_after(one_slot_server):
    server = one_slot_server
    http, running = _open_stream(server, LONG_ANSWER)
    lines = running.iter_lines()
    next(lines)  # generating now: the only slot is taken
    waiting = httpx.Client(timeout=300)
    queued = waiting.send(waiting.build_request("POST", f"{server.url}/v1/completions", json={
        "model": server.model, "prompt": "queued", "max_tokens": LONG_ANSWER, "stream": True}), stream=True)
    _wait_for(lambda: server.metrics()["qwen2edge_queue_depth"] == 1, what="the queue to fill")
    with pytest.raises(openai.RateLimitError) as exc:
        _client(server).completions.create(model=server.model, prompt="one too many", max_tokens=2)
    assert exc.value.status_code == 429 and exc.value.code == "queue_full"
    assert int(exc.value.response.headers["retry-after"]) >= 1
    # Leaving frees both: the waiting request drops out of the queue, the running one stops.
    queued.close(); waiting.close()
    running.close(); http.close()
    _wait_for(lambda: server.metrics()["qwen2edge_requests_running"] == 0, what="the slot to free")
    assert server.metrics()["qwen2edge_queue_depth"] == 0


def test_disconnect_mid_stream_cancels_and_frees_the_slot(one_slot_server):
    server = one_slot_server
    before = server.metrics()
    http, resp = _open_stream(server, LONG_ANSWER)
    lines = resp.iter_lines()
    got = [next(lines) for _ in range(6)]  # a few tokens (events are separated by blank lines)
    assert sum(1 for line in got if line.startswith("data: ")) >= 3
    resp.close(); http.close()
    cancelled = 'qwen2edge_generations_total{finish_reason="cancelled"}'
    _wait_for(lambda: server.metrics().get(cancelled, 0) == before.get(cancelled, 0) + 1, timeout=30,
              what="the generation to be cancelled")
    after = server.metrics()
    assert after["qwen2edge_requests_running"] == 0
    # It stopped early: far fewer tokens than it asked for were generated.
    assert after["qwen2edge_generation_tokens_total"] - before.get("qwen2edge_generation_tokens_total", 0) < LONG_ANSWER / 4
    # The single slot serves the next request at once.
    t0 = time.monotonic()
    out = _client(server).completions.create(model=server.model, prompt="next please", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens >= 1 and time.monotonic() - t0 < 30


def test_disconnect_while_waiting_for_a_non_streaming_answer_cancels(one_slot_server):
    server = one_slot_server
    cancelled = 'qwen2edge_generations_total{finish_reason="cancelled"}'
    before = server.metrics().get(cancelled, 0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{server.url}/v1/completions", timeout=httpx.Timeout(30, read=0.5), json={
            "model": server.model, "prompt": "A long answer", "max_tokens": LONG_ANSWER, "temperature": 0})
    _wait_for(lambda: server.metrics().get(cancelled, 0) == before + 1, timeout=30,
              what="the abandoned generation to be cancelled")
    _wait_for(lambda: server.metrics()["qwen2edge_requests_running"] == 0, timeout=10, what="the slot to free")
    assert server.metrics()['qwen2edge_requests_total{endpoint="/v1/completions",status="499"}'] >= 1


def test_sigterm_drains_in_flight_requests_then_exits_0(long_bundle):
    server = ServerProcess(long_bundle, "--max-concurrency", "2", "--max-batch", "2")
    try:
        http, resp = _open_stream(server, 60)
        lines = resp.iter_lines()
        first = next(lines)
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in (first, *lines) if line]  # the stream runs to its end despite the signal
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "\n".join(rest)
        http.close()
        assert server.proc.wait(60) == 0, server.log()
        assert "server stopped" in server.log()
        with pytest.raises(httpx.ConnectError):  # and it no longer listens
            httpx.get(f"{server.url}/health", timeout=5)
    finally:
        server.stop(signal.SIGKILL)

"""Shutdown past --shutdown-timeout: what is still running ends the OpenAI way, a 503 error body or a
final error event, never a cut connection or a plain-text 500; the server still exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from .conftest import LONG_ANSWER, ServerProcess


def test_requests_still_running_at_the_shutdown_timeout_get_503_and_an_error_event(long_bundle):
    server = ServerProcess(long_bundle, "--max-concurrency", "2", "--max-batch", "2", "--shutdown-timeout", "1")
    try:
        body = {"model": server.model, "prompt": "Tell me everything", "max_tokens": LONG_ANSWER, "temperature": 0}
        http = httpx.Client(timeout=120)
        stream = http.send(http.build_request("POST", f"{server.url}/v1/completions", json={**body, "stream": True}),
                           stream=True)
        lines = stream.iter_lines()
        next(lines)  # generating
        plain: dict = {}
        waiter = threading.Thread(target=lambda: plain.update(
            r=httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)))
        waiter.start()
        deadline = time.monotonic() + 60
        while server.metrics()["qwen2edge_requests_running"] < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        waiter.join(60)
        assert events and events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        assert last["error"]["code"] == "shutting_down" and last["error"]["type"] == "server_error", last
        r = plain["r"]
        assert r.status_code == 503 and r.headers["content-type"].startswith("application/json"), r.text
        assert r.json()["error"]["code"] == "shutting_down"
        assert server.proc.wait(60) == 0, server.log()
        stream.close(); http.close()
    finally:
        server.stop(signal.SIGKILL)

"""Prompts that must not hurt the server: one far beyond the context is refused by its size before any
tokenizing (the event loop stays free for everyone else), and text that is not valid Unicode is a 400."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
HUGE = 7 * 2**20  # characters: under the 8 MiB body limit, far over any 96-token prompt


def _post(server, path: str, body: bytes | dict, timeout: float = 120) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=content, headers=AUTH, timeout=timeout)
    return r, time.monotonic() - t0


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    return r.json()["error"]


def test_huge_prompts_are_refused_by_size_while_small_requests_are_answered(tiny_server):
    """Four 7 MiB prompts at once (one word each: the slowest text to tokenize) are refused as too long,
    and meanwhile /health and a small completion answer promptly."""
    huge = json.dumps({"model": tiny_server.model, "prompt": "a" * HUGE, "max_tokens": 1}).encode()
    chat = json.dumps({"model": tiny_server.model, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "b" * HUGE}]}).encode()
    with ThreadPoolExecutor(4) as pool:
        big = [pool.submit(_post, tiny_server, "/v1/completions", huge) for _ in range(3)]
        big.append(pool.submit(_post, tiny_server, "/v1/chat/completions", chat))
        time.sleep(0.3)  # the uploads are in flight
        t0 = time.monotonic()
        health = httpx.get(f"{tiny_server.url}/health", timeout=60)
        health_s = time.monotonic() - t0
        small, small_s = _post(tiny_server, "/v1/completions", {"model": tiny_server.model, "prompt": "Hello",
                                                                 "max_tokens": 3, "temperature": 0})
        refused = [f.result(timeout=300) for f in big]
    assert health.status_code == 200 and small.status_code == 200, small.text
    assert small.json()["usage"]["completion_tokens"] >= 1
    for (r, _), param in zip(refused, ["prompt"] * 3 + ["messages"]):
        err = _error(r, 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == param, err
        assert "maximum context length is 96 tokens" in err["message"], err
    # Before the size check, each huge prompt held the GIL while it was tokenized (~18 s each on a
    # 2-core machine), and /health waited behind them; generous bounds for a loaded CI machine.
    assert health_s < 5, health_s
    assert small_s < 15, small_s
    assert max(s for _, s in refused) < 30, [s for _, s in refused]


def test_a_prompt_under_the_size_bound_but_over_the_context_is_still_refused(tiny_server):
    r, _ = _post(tiny_server, "/v1/completions", {"model": tiny_server.model, "prompt": "word " * 500})
    err = _error(r, 400)
    # Counted in tokens (the size bound let it through to the tokenizer).
    assert err["code"] == "context_length_exceeded" and " tokens in the prompt" not in err["message"], err
    assert "in the prompt" in err["message"] and "characters" not in err["message"], err


@pytest.mark.parametrize("path, field", [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")])
def test_a_lone_surrogate_is_400_not_500(tiny_server, path, field):
    text = '"abc\\ud800def"'  # valid JSON, but decodes to a string that is not valid Unicode
    body = (f'{{"model": "{tiny_server.model}", "max_tokens": 2, "prompt": {text}}}' if field == "prompt" else
            f'{{"model": "{tiny_server.model}", "max_tokens": 2, "messages": [{{"role": "user", "content": {text}}}]}}')
    r, _ = _post(tiny_server, path, body.encode())
    err = _error(r, 400)
    assert err["param"] == field and "surrogate" in err["message"] and "U+D800" in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_an_error_quoting_a_lone_surrogate_is_still_an_openai_error(tiny_server):
    """The 404 for an unknown model quotes the model id; with a lone surrogate in it, encoding the body
    failed and the client got a 500."""
    r, _ = _post(tiny_server, "/v1/completions", b'{"model": "m\\ud800", "prompt": "x"}')
    err = _error(r, 404)
    assert err["code"] == "model_not_found" and err["param"] == "model", err

"""Every kind of bad request gets its status code and an OpenAI-style error body; the server stays up."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _post(server, path: str, body, headers=AUTH, raw: bool = False) -> httpx.Response:
    kw = {"content": body} if raw else {"json": body}
    return httpx.post(f"{server.url}{path}", headers={"Content-Type": "application/json", **headers}, timeout=60, **kw)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


@pytest.mark.parametrize("raw", ['{"model": "x", "prompt": ', "not json at all", "\xff\xfe", "[1, 2]"])
def test_malformed_json_is_400(tiny_server, raw):
    err = _error(_post(tiny_server, "/v1/completions", raw.encode("latin-1"), raw=True), 400)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"


@pytest.mark.parametrize("path, body, param, needle", [
    ("/v1/completions", {"prompt": "hi"}, "model", "'model'"),
    ("/v1/completions", {"model": "M"}, "prompt", "'prompt'"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "temperature": 2.5}, "temperature", "less than or equal to 2"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "temperature": -1}, "temperature", "temperature"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "top_p": 0}, "top_p", "greater than 0"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "top_p": 1.5}, "top_p", "top_p"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "max_tokens": "ten"}, "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "n": 17}, "n", "at most 16 choices"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "seed": -3}, "seed", "seed"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "top_k": -1}, "top_k", "top_k"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "stop": [""]}, "stop", "non-empty"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "presence_penalty": 2.5}, "presence_penalty", "2"),
    ("/v1/completions", {"model": "M", "prompt": "hi", "bogus": 1}, "bogus", "Unrecognized"),
    ("/v1/completions", {"model": "M", "prompt": ""}, "prompt", "empty"),
    ("/v1/completions", {"model": "M", "prompt": [10**9]}, "prompt", "outside the vocabulary"),
    ("/v1/chat/completions", {"model": "M", "messages": []}, "messages", "messages"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role",
     "role"),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages", "text only"),
])
def test_invalid_parameters_are_400(tiny_server, path, body, param, needle):
    body = {k: (tiny_server.model if v == "M" and k == "model" else v) for k, v in body.items()}
    err = _error(_post(tiny_server, path, body), 400)
    assert err["param"] == param and needle in err["message"], err


CHAT = {"model": "M", "messages": [{"role": "user", "content": "x"}]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("path, extra, param, needle", [
    # several prompts and choices
    ("/v1/completions", {"prompt": ["a", ""]}, "prompt", "empty (prompt 1)"),
    ("/v1/completions", {"prompt": [[1, 2], [10**9]]}, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": ["a"] * 6, "n": 16}, "n", "more than this server queues"),
    ("/v1/completions", {"prompt": "hi", "n": 3, "best_of": 2}, "best_of", "must be >= n"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3, "stream": True}, "best_of", "cannot be streamed"),
    ("/v1/completions", {"prompt": "hi", "best_of": 17}, "best_of", "at most 16 candidates"),
    # logprobs and echo
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "echo"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "logprobs set to true"),
    # penalties, bias, vLLM extensions
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -2.5}, "frequency_penalty", "-2"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias", "not a token id"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"999999999": 1}}, "logit_bias", "not a token id"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 20, "max_tokens": 5}, "min_tokens", "'max_tokens'"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": "yes"}, "ignore_eos", "boolean"),
    # structured outputs
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema", "'schema'"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", "'response_format.json_schema.name'"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, "response_format", "Invalid type: strin"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(?=a)"}}}}, "response_format", "look-around"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "[a-"}, "guided_regex", "unclosed character class"),
    ("/v1/completions", {"prompt": "hi", "guided_choice": []}, "guided_choice", "at least 1"),
    ("/v1/completions", {"prompt": "hi", "guided_grammar": "start: foo"}, "guided_grammar", "unknown name"),
    ("/v1/completions", {"prompt": "hi", "guided_json": "{not json"}, "guided_json", "no valid JSON schema"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "only one"),
    # tools
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope'"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice", "no 'tools'"),
    ("/v1/chat/completions", {"tools": [{"type": "retrieval"}]}, "tools.0.type", "function"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]},
     "messages.1.tool_call_id", "tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
     "function": {"name": "f", "arguments": "{bad"}}]}]}, "messages.0.tool_calls.0.function.arguments", "not valid JSON"),
    # OpenAI parameters this server refuses by name
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix", "insertion"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy"}}, "audio", "text only"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities", "text"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions", "'tools'"),
    ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort", "reasoning"),
    ("/v1/chat/completions", {"parallel_tool_calls": "no"}, "parallel_tool_calls", "boolean"),
])
def test_new_parameters_refuse_bad_values_by_name(tiny_server, path, extra, param, needle):
    base = {"model": tiny_server.model, **({} if path == "/v1/completions" else {"messages": CHAT["messages"]})}
    err = _error(_post(tiny_server, path, {**base, **extra}), 400)
    assert err["param"] == param and needle in err["message"], err


def test_harmless_values_of_refused_parameters_pass(tiny_server):
    body = {"model": tiny_server.model, "messages": CHAT["messages"], "max_tokens": 2, "modalities": ["text"],
            "user": "u1", "prompt_cache_key": "k"}
    assert _post(tiny_server, "/v1/chat/completions", body).status_code == 200
    body = {"model": tiny_server.model, "prompt": "hi", "max_tokens": 2, "suffix": None}
    assert _post(tiny_server, "/v1/completions", body).status_code == 200


def test_prompt_beyond_the_context_is_400(tiny_server):
    long_prompt = "hello " * 120  # > 96 tokens, the bundle's max_seq_len
    err = _error(_post(tiny_server, "/v1/completions", {"model": tiny_server.model, "prompt": long_prompt}), 400)
    assert err["code"] == "context_length_exceeded" and "maximum context length is 96" in err["message"]
    # A short prompt asking for more new tokens than fit is refused the same way.
    err = _error(_post(tiny_server, "/v1/completions", {"model": tiny_server.model, "prompt": "hi",
                                                        "max_tokens": 96}), 400)
    assert err["code"] == "context_length_exceeded"
    messages = [{"role": "user", "content": long_prompt}]
    err = _error(_post(tiny_server, "/v1/chat/completions", {"model": tiny_server.model, "messages": messages}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"


def test_oversized_body_is_413(tiny_server):
    body = b'{"model": "m", "prompt": "' + b"a" * (9 * 2**20) + b'"}'
    err = _error(_post(tiny_server, "/v1/completions", body, raw=True), 413)
    assert err["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "m", "prompt": "'
        for _ in range(9):
            yield b"a" * 2**20
        yield b'"}'

    r = httpx.post(f"{tiny_server.url}/v1/completions", content=chunked(), headers=AUTH, timeout=60)
    assert _error(r, 413)["code"] == "request_too_large"


def test_unknown_model_is_404_model_not_found(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert exc.value.code == "model_not_found" and tiny_server.model in exc.value.message


def test_api_key_is_required(tiny_server):
    for key in ("wrong-key", ""):
        client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=key or "x", max_retries=0,
                               default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as exc:
            client.chat.completions.create(model=tiny_server.model, messages=[{"role": "user", "content": "hi"}])
        assert exc.value.status_code == 401
        assert exc.value.code == ("invalid_api_key" if key else "missing_api_key")
    err = _error(httpx.get(f"{tiny_server.url}/v1/models"), 401)
    assert err["code"] == "missing_api_key"
    # Health and metrics stay open for probes and scrapers.
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200
    assert httpx.get(f"{tiny_server.url}/metrics").status_code == 200


def test_unknown_route_and_method_use_the_error_shape(tiny_server):
    assert _error(httpx.get(f"{tiny_server.url}/v1/nothing", headers=AUTH), 404)
    assert _error(httpx.get(f"{tiny_server.url}/v1/completions", headers=AUTH), 405)


def test_server_still_answers_after_bad_input(tiny_server):
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY, max_retries=0)
    out = client.completions.create(model=tiny_server.model, prompt="still alive", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1

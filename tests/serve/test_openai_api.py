"""The official `openai` client against a real server: completions, chat, streaming, stop strings, seeds."""

from __future__ import annotations

import httpx
import openai
import pytest

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.sampling import SamplingParams

from .conftest import API_KEY


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_bundle_factory):
    """The same bundle run in-process by the library: what the server must reproduce."""
    bundle = Bundle.open(tiny_bundle_factory("gqa")[1])
    return bundle, bundle.generator()


def _local_text(local, ids, max_tokens, **kw):
    _, gen = local
    results, _ = gen.generate([ids], SamplingParams(max_new_tokens=max_tokens, **kw))
    return results[0]


def test_models_and_health(tiny_server, client):
    assert [m.id for m in client.models.list().data] == [tiny_server.model]
    assert client.models.retrieve(tiny_server.model).id == tiny_server.model
    assert httpx.get(f"{tiny_server.url}/health").json()["status"] == "ok"


def test_completion_equals_library_generation(tiny_server, client, local):
    bundle, _ = local
    out = client.completions.create(model=tiny_server.model, prompt="The quick brown fox", max_tokens=12,
                                    temperature=0)
    ref = _local_text(local, bundle.tokenizer.encode("The quick brown fox"), 12)
    assert out.choices[0].text == ref.text and ref.text
    assert out.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == len(ref.token_ids)
    assert out.usage.total_tokens == 4 + len(ref.token_ids)
    # Token-id prompts and echo follow OpenAI too.
    ids = bundle.tokenizer.encode("The quick brown fox")
    by_ids = client.completions.create(model=tiny_server.model, prompt=ids, max_tokens=12, temperature=0, echo=True)
    assert by_ids.choices[0].text == "The quick brown fox" + ref.text


def test_streaming_completion_equals_non_streaming(tiny_server, client):
    kw = dict(model=tiny_server.model, prompt="Once upon a time", max_tokens=10, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 2  # really streamed
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and not chunks[-1].choices


def test_raw_stream_is_openai_sse(tiny_server):
    body = {"model": tiny_server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0, "stream": True}
    r = httpx.post(f"{tiny_server.url}/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_chat_uses_the_chat_template(tiny_server, client, local):
    bundle, _ = local
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
    out = client.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=15, temperature=0)
    ids = bundle.tokenizer.encode(bundle.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    ref = _local_text(local, ids, 15)
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.text
    assert out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=15,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_without_max_tokens_runs_to_the_context_limit(tiny_server, client):
    out = client.chat.completions.create(model=tiny_server.model, messages=[{"role": "user", "content": "hi"}],
                                         temperature=0)
    assert out.usage.total_tokens <= 96  # the bundle's max_seq_len
    assert out.choices[0].finish_reason == "stop" or out.usage.total_tokens == 96


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_output(tiny_server, client, stream):
    kw = dict(model=tiny_server.model, prompt="Hello world", max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    # A stop string taken from the middle of the real output: the answer must end right before it.
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full.index(stop)
    assert stop.strip() and 0 < cut < len(full)
    if stream:
        chunks = list(client.completions.create(**kw, stop=[stop, "\x00never"], stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason][-1]
    else:
        out = client.completions.create(**kw, stop=stop)
        text, reason = out.choices[0].text, out.choices[0].finish_reason
    assert text == full[:cut] and reason == "stop"


def test_seed_makes_sampling_reproducible(tiny_server, client):
    kw = dict(model=tiny_server.model, prompt="Random words:", max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.completions.create(**kw, seed=1234).choices[0].text
    b = client.completions.create(**kw, seed=1234).choices[0].text
    c = client.completions.create(**kw, seed=4321).choices[0].text
    assert a == b and a != c
    # Extensions beyond OpenAI's parameters go through extra_body.
    d = client.completions.create(**kw, seed=1234, extra_body={"top_k": 1}).choices[0].text
    greedy = client.completions.create(model=tiny_server.model, prompt="Random words:", max_tokens=12,
                                       temperature=0).choices[0].text
    assert d == greedy


def test_metrics_count_requests_and_tokens(tiny_server, client):
    before = tiny_server.metrics()
    out = client.completions.create(model=tiny_server.model, prompt="Count me", max_tokens=5, temperature=0)
    after = tiny_server.metrics()
    key = 'qwen2edge_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    gen = "qwen2edge_generation_tokens_total"
    assert after[gen] - before.get(gen, 0) == out.usage.completion_tokens
    assert after["qwen2edge_request_latency_seconds_count{endpoint=\"/v1/completions\"}"] >= 1
    assert after["qwen2edge_queue_depth"] == 0 and after["qwen2edge_requests_running"] == 0

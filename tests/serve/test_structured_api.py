"""Structured outputs and tool calls through the official `openai` client against real servers on random-weight
models: the real Qwen2 tokenizer and a small byte-level BPE, streamed and not, next to unconstrained requests."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.tokenizer import BundleTokenizer
from qwen2edge.serve import tools

from ..runtime.test_constrain import SCHEMA  # every string and number bounded
from .conftest import ServerProcess

CONTEXT = 2048  # the tool prompt alone is ~250 Qwen tokens, ~630 small-vocabulary ones
MODELS = {"qwen_tokenizer": "gqa_4k", "small_vocab": "small_vocab"}  # gqa_4k: the "gqa" weights, 4k positions
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
               "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                           "parameters": TIME_PARAMS}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=sorted(MODELS))
def served(request, tiny_bundle_factory):
    """(server, client, bundle tokenizer) for the Qwen2-tokenizer model and the small-vocabulary one."""
    bundle = tiny_bundle_factory(MODELS[request.param], max_seq_len=CONTEXT)[1]
    server = ServerProcess(bundle, "--max-concurrency", "8", "--max-batch", "8")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=180)
    yield server, client, BundleTokenizer.from_dir(bundle)
    assert server.stop() == 0, server.log()


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_json_schema_outputs_validate_over_seeds(served):
    server, client, _ = served
    kw = dict(model=server.model, messages=[{"role": "user", "content": "A person, as JSON"}], max_tokens=200,
              temperature=1.0, response_format=_schema_format(SCHEMA))
    with ThreadPoolExecutor(8) as pool:  # concurrent: constrained rows share in-flight batches
        outs = list(pool.map(lambda seed: client.chat.completions.create(seed=seed, **kw), range(16)))
    texts = []
    for out in outs:
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        texts.append(choice.message.content)
    assert len(set(texts)) > 8
    chunks = list(client.chat.completions.create(seed=3, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == texts[3]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_and_guided_extensions(served):
    server, client, _ = served
    kw = dict(model=server.model, max_tokens=120, temperature=1.0)
    with ThreadPoolExecutor(4) as pool:
        objects = list(pool.map(lambda s: client.chat.completions.create(
            messages=ASK, seed=s, response_format={"type": "json_object"}, **kw), range(4)))
    for out in objects:
        if out.choices[0].finish_reason == "stop":  # "any object" is unbounded: a weak model may run out of tokens
            assert isinstance(json.loads(out.choices[0].message.content), dict)
    assert any(o.choices[0].finish_reason == "stop" for o in objects)
    checks = [({"guided_regex": r"[A-Z][a-z]{1,6} [0-9]{2}"}, lambda t: re.fullmatch(r"[A-Z][a-z]{1,6} [0-9]{2}", t)),
              ({"guided_choice": ["positive", "negative"]}, lambda t: t in ("positive", "negative")),
              ({"guided_grammar": 'start: "[" item ("," item)* "]"\nitem: /[a-z]{1,4}/'},
               lambda t: re.fullmatch(r"\[[a-z]{1,4}(,[a-z]{1,4})*\]", t)),
              ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None)]
    cases = [(extra, check, seed) for extra, check in checks for seed in range(3)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda c: client.completions.create(prompt="Answer:", seed=c[2], extra_body=c[0],
                                                                 **kw).choices[0], cases))
    for (extra, check, _), out in zip(cases, outs):
        if out.finish_reason == "stop" or "guided_json" in extra or "guided_choice" in extra:  # bounded ones end
            assert check(out.text), (extra, out.text)


def test_constrained_rows_leave_plain_rows_alone(served):
    server, client, _ = served
    plain = dict(model=server.model, prompt="Once upon a time", max_tokens=24, temperature=0)
    alone = client.completions.create(**plain).choices[0].text
    constrained = dict(model=server.model, prompt="JSON:", max_tokens=200, temperature=1.0,
                       extra_body={"guided_json": SCHEMA})

    def call(i: int):
        if i % 2:
            return client.completions.create(**plain).choices[0].text
        return client.completions.create(seed=i, **constrained).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(call, range(8)))
    assert outs[1::2] == [alone] * 4
    for text in outs[0::2]:
        jsonschema.validate(json.loads(text), SCHEMA)


def _check_calls(calls, names=("get_weather",)) -> None:
    params = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_tool_calls_parse_streamed_and_not(served, choice):
    server, client, _ = served
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else "required"
    names = ("get_weather",) if choice == "named" else ("get_weather", "get_time")
    kw = dict(model=server.model, messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=1000,
              temperature=1.0)
    for seed in range(4):
        out = client.chat.completions.create(seed=seed, **kw).choices[0]
        assert out.finish_reason == "tool_calls" and out.message.content is None
        _check_calls(out.message.tool_calls, names)
        if choice == "named":
            assert len(out.message.tool_calls) == 1
    whole = client.chat.completions.create(seed=1, **kw).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(seed=1, stream=True, **kw))
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            call = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            call["arguments"] += tc.function.arguments or ""
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == [
        (tc.function.name, tc.function.arguments) for tc in whole]
    assert all(calls[i]["id"] for i in calls) and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_tool_history_is_rendered_and_auto_or_none_answer_in_text(served):
    server, client, tok = served
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"}]
    out = client.chat.completions.create(model=server.model, messages=history, tools=TOOLS, max_tokens=10,
                                         temperature=0)
    req = tools.ChatRequest.model_validate({"model": "m", "messages": history, "tools": TOOLS})
    prompt = tools.render(tok, req)
    assert "<tool_response>\n21 degrees, sunny\n</tool_response>" in prompt and '"name": "get_time"' in prompt
    assert out.usage.prompt_tokens == len(tok.encode(prompt))
    assert out.choices[0].finish_reason in ("stop", "length") and not out.choices[0].message.tool_calls
    none = client.chat.completions.create(model=server.model, messages=history, tools=TOOLS, tool_choice="none",
                                          max_tokens=10, temperature=0)
    assert none.choices[0].message.content == out.choices[0].message.content or not none.choices[0].message.tool_calls


def test_the_server_renders_with_the_bundle_template(tiny_bundle_factory):
    """The served prompt is exactly what the library's renderer gives (the template path is in test_tools.py)."""
    bundle = Bundle.open(tiny_bundle_factory("gqa_4k", max_seq_len=CONTEXT)[1])
    req = tools.ChatRequest.model_validate({"model": "m", "messages": ASK, "tools": TOOLS, "tool_choice": "required"})
    text = tools.render(bundle.tokenizer, req)
    assert text.endswith("<|im_start|>assistant\n") and "# Tools" in text and text.count('"type": "function"') == 2

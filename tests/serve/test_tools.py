"""Tool calls without a server: Qwen2.5's prompt layout, the bundle's own tools template, parsing finished and
streamed outputs into OpenAI's tool_calls."""

from __future__ import annotations

import json
import random
import re

import pytest

from qwen2edge.runtime.tokenizer import BundleTokenizer
from qwen2edge.serve import tools
from qwen2edge.serve.schemas import APIError, ChatRequest

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18C"},
    {"role": "tool", "tool_call_id": "c2", "content": "24C"},
]


def _req(**kw) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": HISTORY, "tools": [WEATHER], **kw})


def test_templates_without_tools_get_qwen25_text(qwen_tokenizer_dir):
    tok = BundleTokenizer.from_dir(qwen_tokenizer_dir)  # plain ChatML: knows no tools
    tool_json = json.dumps(WEATHER, ensure_ascii=False)
    expected = (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{tool_json}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n"
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response>\n<tool_response>\n24C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    assert tools.render(tok, _req()) == expected


def test_a_template_that_renders_tools_gets_them(qwen_tokenizer_dir):
    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}:"
                "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.arguments | tojson }}{% endfor %}"
                "{{ m.content }};{% endfor %}")
    base = BundleTokenizer.from_dir(qwen_tokenizer_dir)
    tok = BundleTokenizer(base._tok, {"chat_template": template})
    # Arguments reach the template as objects (as vLLM hands them to Qwen2.5's template), not JSON strings.
    assert tools.render(tok, _req()) == ('[get_weather]system:Be brief.;user:Weather in Paris and Rome?;assistant:'
                                         '<tool_call>{"city": "Paris"}<tool_call>{"city": "Rome"};tool:18C;tool:24C;')


def test_forced_grammar_names_one_function_or_any():
    named = tools.forced_grammar(_req(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named.kind == "lark" and named.source.startswith("start: call\n") and '"const": "get_weather"' in named.source
    many = tools.forced_grammar(_req(tool_choice="required"))
    assert many.source.startswith('start: call ("\\n" call)*')
    one = tools.forced_grammar(_req(tool_choice="required", parallel_tool_calls=False))
    assert one.source.startswith("start: call\n")
    assert tools.forced_grammar(_req(tool_choice="auto")) is None
    with pytest.raises(APIError) as exc:
        tools.check_choice(_req(tool_choice={"type": "function", "function": {"name": "nope"}}))
    assert exc.value.param == "tool_choice"


OUTPUT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"x": "}"}]}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
          '<tool_call>\nnot json\n</tool_call> done')


def test_parse_finished_output():
    content, calls = tools.parse(OUTPUT)
    assert content == "Let me check.\n<tool_call>\nnot json\n</tool_call> done"  # the malformed block stays text
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": [1, {"x": "}"}]}
    assert calls[1]["function"]["arguments"] == "{}"
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    assert tools.parse("no calls here") == ("no calls here", [])
    cut = tools.parse('<tool_call>\n{"name": "f", "arguments": {"a": 1}}')  # ended before the closing tag
    assert cut[0] is None and cut[1][0]["function"]["arguments"] == '{"a": 1}'


@pytest.mark.parametrize("seed", range(8))
def test_streamed_deltas_add_up_to_the_parsed_calls(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(OUTPUT)), 25))
    pieces = [OUTPUT[a:b] for a, b in zip([0, *cuts], [*cuts, len(OUTPUT)])]
    stream, deltas = tools.ToolStream(), []
    for piece in pieces:
        deltas += stream.feed(piece)
    deltas += stream.close()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"name": None, "arguments": "", "ids": []})
            if "id" in tc:
                call["ids"].append(tc["id"])
                call["name"] = tc["function"]["name"]
            call["arguments"] += tc["function"]["arguments"]
    parsed_content, parsed = tools.parse(OUTPUT)
    assert re.sub("\n+", "\n", content).strip() == parsed_content  # the stream keeps the blocks' newlines
    assert [calls[i]["name"] for i in sorted(calls)] == [c["function"]["name"] for c in parsed]
    assert [calls[i]["arguments"] for i in sorted(calls)] == [c["function"]["arguments"] for c in parsed]
    assert all(len(c["ids"]) == 1 for c in calls.values())  # one header per call
    assert stream.calls == 2

"""Tool calls the way Qwen2.5 writes them: tool signatures in the system prompt, calls as
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, results as `<tool_response>` blocks.

A bundle whose chat template renders `tools` itself gets them as transformers passes them; any other
template gets the messages rewritten into Qwen2.5's text first. A forced call (`tool_choice` "required"
or a named function) is a grammar over that format, with the arguments held to the function's
parameter schema; the output is parsed back into OpenAI's `tool_calls`, streamed or not.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from ..errors import InputError
from ..runtime.constrain import JSON_STYLE, Grammar
from ..runtime.tokenizer import BundleTokenizer
from .schemas import APIError, ChatRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|\Z)", re.S)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # what chat templates' tojson writes


def wants_tools(req: ChatRequest) -> bool:
    """Whether the output is parsed for tool calls."""
    return bool(req.tools) and req.tool_choice != "none"


def forced_function(req: ChatRequest) -> str | None:
    """The function a named tool_choice forces (400 when no tool has that name)."""
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return None
    names = [t.function.name for t in req.tools or ()]
    if choice.function.name not in names:
        raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not in 'tools' "
                       f"({', '.join(names) or 'none given'}): name one of them", param="tool_choice")
    return choice.function.name


def check_choice(req: ChatRequest) -> None:
    """tool_choice needs tools (except "none"); a named one must exist."""
    if req.tool_choice not in (None, "none", "auto") and not req.tools:
        raise APIError(400, "tool_choice forces a tool call but no 'tools' were given: send the tools",
                       param="tool_choice")
    forced_function(req)


# ---- prompt --------------------------------------------------------------------------------------

def render(tokenizer: BundleTokenizer, req: ChatRequest) -> str:
    """The chat prompt: the bundle's own template, with tools when it renders them, else the messages
    rewritten into Qwen2.5's tool text first."""
    messages = _messages(req)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    template = tokenizer.chat_template or ""
    try:
        if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if "tools" in template and "tool_call" in template:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools or None)
        return tokenizer.apply_chat_template(_as_qwen_text(messages, tools), add_generation_prompt=True)
    except InputError as exc:
        raise APIError(400, exc.render(lambda name: f"'{name}'"), param="messages", code="invalid_value") from None


def _messages(req: ChatRequest) -> list[dict[str, Any]]:
    """Template input: "developer" becomes "system", tool-call arguments become objects (templates
    serialize them with tojson)."""
    out = []
    for i, m in enumerate(req.messages):
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, f"messages[{i}] has role 'tool' but no 'tool_call_id': give the id of the call "
                               "it answers", param=f"messages.{i}.tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    args = json.loads(call.function.arguments)
                except json.JSONDecodeError as exc:
                    raise APIError(400, f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON ({exc}): "
                                   "send the arguments as a JSON string",
                                   param=f"messages.{i}.tool_calls.{j}.function.arguments") from None
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": args}})
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _as_qwen_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Plain role/content messages carrying Qwen2.5's tool text, for templates that know no tools."""
    out: list[dict[str, str]] = []
    if tools:
        block = _TOOLS_INTRO + "".join("\n" + _dumps(t) for t in tools) + _TOOLS_OUTRO
        if messages and messages[0]["role"] == "system":
            block = messages[0]["content"] + "\n\n" + block
            messages = messages[1:]
        out.append({"role": "system", "content": block})
    for msg in messages:
        if msg["role"] == "tool":
            response = f"<tool_response>\n{msg['content']}\n</tool_response>"
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool": "1"})
            continue
        content = msg["content"]
        for call in msg.get("tool_calls") or ():
            fn = call["function"]
            text = f'{OPEN}\n{{"name": {_dumps(fn["name"])}, "arguments": {_dumps(fn["arguments"])}}}\n{CLOSE}'
            content = f"{content}\n{text}" if content else text
        out.append({"role": msg["role"], "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


# ---- forced calls ----------------------------------------------------------------------------------

def forced_grammar(req: ChatRequest) -> Grammar | None:
    """The grammar of a forced call: one call of the named function, or (`required`) one or more calls
    (one when parallel_tool_calls is false) of any given function, arguments held to its schema."""
    if not req.tools or req.tool_choice in (None, "none", "auto"):
        return None
    named = forced_function(req)
    tools = [t for t in req.tools if named is None or t.function.name == named]
    rules = []
    for k, tool in enumerate(tools):
        params = tool.function.parameters or {"type": "object", "properties": {}, "additionalProperties": False}
        schema = {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": params},
                  "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": JSON_STYLE}
        rules.append(f"fn{k}: %json {_dumps(schema)}")
    alternatives = " | ".join(f"fn{k}" for k in range(len(tools)))
    many = named is None and req.parallel_tool_calls is not False
    start = 'start: call ("\\n" call)*' if many else "start: call"
    call = f"call: {_dumps(OPEN + chr(10))} ({alternatives}) {_dumps(chr(10) + CLOSE)}"
    return Grammar("lark", "\n".join([start, call, *rules]), "tools")


# ---- parsing -----------------------------------------------------------------------------------------

def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def split_call(block: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one call block, or None when it is no call. The arguments are
    the generated text itself, so a streamed call's fragments add up to exactly them."""
    head = _HEAD.match(block)
    if head:
        try:
            name = json.loads(head.group(1))
            _, end = json.JSONDecoder().raw_decode(block, head.end())
        except json.JSONDecodeError:
            return None
        if block[end:].strip() == "}":
            return name, block[head.end():end]
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    return obj["name"], _dumps(obj.get("arguments", obj.get("parameters", {})))


def parse(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a finished output: every well-formed call block becomes a call; the text
    around them (and any malformed block) stays content, None when nothing is left."""
    calls, kept, last = [], [], 0
    for m in _BLOCK.finditer(text):
        call = split_call(m.group(1).strip())
        if call is None:
            continue
        kept.append(text[last:m.start()])
        last = m.end()
        calls.append({"id": new_call_id(), "type": "function", "function": {"name": call[0], "arguments": call[1]}})
    kept.append(text[last:])
    if not calls:
        return text, []
    content = "\n".join(piece.strip("\n") for piece in kept if piece.strip()).strip()
    return (content or None), calls


class ToolStream:
    """Streamed text -> OpenAI deltas: content outside call blocks as it comes (holding back what may start
    `<tool_call>`), and per call a first delta with id and name, then argument fragments."""

    def __init__(self) -> None:
        self.calls = 0
        self._buf = ""
        self._block: str | None = None  # text of the open call block
        self._sent = 0  # argument characters already sent for the open block
        self._head: re.Match | None = None

    def feed(self, text: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        self._buf += text
        while self._buf:
            if self._block is None:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = _partial(self._buf, OPEN)
                    if len(self._buf) > keep:
                        out.append({"content": self._buf[:len(self._buf) - keep]})
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                if at:
                    out.append({"content": self._buf[:at]})
                self._buf, self._block, self._sent, self._head = self._buf[at + len(OPEN):], "", 0, None
                continue
            at = self._buf.find(CLOSE)
            if at < 0:
                keep = _partial(self._buf, CLOSE)
                self._block += self._buf[:len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                out += self._progress()
                return out
            self._block += self._buf[:at]
            self._buf = self._buf[at + len(CLOSE):]
            out += self._close()
        return out

    def close(self) -> list[dict[str, Any]]:
        """Deltas for whatever is held back when the generation ends."""
        if self._block is not None:
            self._block += self._buf
            self._buf = ""
            return self._close(terminated=False)
        rest, self._buf = self._buf, ""
        return [{"content": rest}] if rest else []

    def _progress(self) -> list[dict[str, Any]]:
        out = []
        if self._head is None:
            self._head = _HEAD.match(self._block)
            if self._head is None:
                return []
            try:
                name = json.loads(self._head.group(1))
            except json.JSONDecodeError:
                return []
            out.append(self._delta({"id": new_call_id(), "type": "function", "function": {"name": name,
                                                                                         "arguments": ""}}))
        args = self._block[self._head.end():].lstrip()  # the head matched before the space after ':' came
        safe = args[:args.rfind("}")].rstrip() if "}" in args else ""  # the outer brace and what follows wait
        if len(safe) > self._sent:
            out.append(self._delta({"function": {"arguments": safe[self._sent:]}}))
            self._sent = len(safe)
        return out

    def _close(self, terminated: bool = True) -> list[dict[str, Any]]:
        raw, self._block = self._block, None
        block = raw.strip()
        call = split_call(block)
        started, self._head = self._head is not None, None
        if call is None:
            self.calls += started  # a header went out: the next call takes the next index
            return [] if started else [{"content": OPEN + raw + (CLOSE if terminated else "")}]
        name, args = call
        if not started:
            out = [self._delta({"id": new_call_id(), "type": "function", "function": {"name": name,
                                                                                      "arguments": args}})]
        elif args.startswith(self._full_sent(block)):
            rest = args[self._sent:]
            out = [self._delta({"function": {"arguments": rest}})] if rest else []
        else:
            out = []
        self.calls += 1
        return out

    def _full_sent(self, block: str) -> str:
        head = _HEAD.match(block)
        return block[head.end():head.end() + self._sent] if head else ""

    def _delta(self, call: dict[str, Any]) -> dict[str, Any]:
        return {"tool_calls": [{"index": self.calls, **call}]}


def _partial(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0

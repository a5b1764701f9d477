"""OpenAI request bodies: parsing, validation and the OpenAI error shape.

Requests are validated with pydantic, then every failure is turned into one `APIError` whose body is
OpenAI's `{"error": {"message", "type", "param", "code"}}`, so clients' error handling works unchanged.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

# Accepted for compatibility, ignored: they change nothing about the output.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
# OpenAI parameters this server does not implement: refused by name, with the reason.
REFUSED_FIELDS = {
    "audio": "audio output is not supported: this model produces text only",
    "modalities": "only text output is supported: drop 'modalities' or send [\"text\"]",
    "prediction": "predicted outputs are not supported: drop 'prediction'",
    "reasoning_effort": "this model has no reasoning mode: drop 'reasoning_effort'",
    "verbosity": "'verbosity' is not supported: drop it and ask for brevity in the prompt",
    "web_search_options": "web search is not supported: drop 'web_search_options'",
    "functions": "'functions' is deprecated and not supported: send 'tools' instead",
    "function_call": "'function_call' is deprecated and not supported: send 'tool_choice' instead",
    "suffix": "'suffix' (insertion) is not supported: send the prompt without it",
}
MAX_STOP_STRINGS = 4
MAX_N = 16  # choices per prompt (n, best_of)
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error answered with an OpenAI-style body and an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: OpenAI's name / description / schema / strict."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Common(BaseModel):
    """Fields shared by both endpoints, with OpenAI's ranges, plus vLLM's extensions (top_k,
    repetition_penalty, min_tokens, ignore_eos, guided_*)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Union[str, list[str], None] = None
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    min_tokens: StrictInt = Field(default=0, ge=0)
    ignore_eos: StrictBool = False
    response_format: ResponseFormat | None = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Union[str, list[str], None]) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Common):
    prompt: Union[str, list[StrictInt], list[str], list[list[StrictInt]]]
    max_tokens: StrictInt | None = Field(default=None, ge=0)  # 0 with echo: score the prompt only
    echo: bool = Field(default=False)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: StrictInt | None = Field(default=None, ge=1, le=MAX_N)

    def prompts(self) -> list[Union[str, list[int]]]:
        """The request's prompts: a string, a list of strings, token ids or lists of token ids."""
        p = self.prompt
        many = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        for i, one in enumerate(many):
            if not one:
                where = f" (prompt {i})" if len(many) > 1 else ""
                raise APIError(400, f"prompt is empty{where}: give at least one character or token id",
                               param="prompt")
        return many


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """Content as plain text; only text parts are accepted."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"content part of type {part.get('type')!r} is not supported: this model "
                               "takes text only; send {'type': 'text', 'text': ...} parts", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: StrictBool | None = None


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; raise APIError(400) naming the offending parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        err["loc"] = _path(err["loc"], body, err["type"] == "missing")
        param = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(400, _explain(err, body), param=param,
                       code="missing_required_parameter" if err["type"] == "missing" else "invalid_value") from None
    extra = set(req.model_extra or {})
    refused = sorted(name for name in extra & set(REFUSED_FIELDS) if not _harmless(name, body[name]))
    if refused:
        raise APIError(400, f"{REFUSED_FIELDS[refused[0]]} (got {body[refused[0]]!r})", param=refused[0],
                       code="unsupported_parameter")
    unknown = sorted(extra - IGNORED_FIELDS - set(REFUSED_FIELDS))
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unrecognized_argument")
    return req


def _path(loc: tuple, body: Any, missing: bool) -> tuple:
    """pydantic's error location as a path into the body: union members' tags (`'str'`, `'list[int]'`)
    are dropped, so `param` names the request field."""
    path, node = [], body
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not (missing and i == len(loc) - 1):
            continue
        path.append(part)
    return tuple(path)


def _harmless(name: str, value: Any) -> bool:
    """Refused parameters sent with their no-op value (null, an empty suffix, text-only modalities)."""
    return value in (None, "") or (name == "modalities" and value == ["text"])


_LIMITS = {
    "n": f"at most {MAX_N} choices per prompt",
    "best_of": f"at most {MAX_N} candidates per prompt",
}


def _explain(err: dict[str, Any], body: dict[str, Any]) -> str:
    loc = [str(x) for x in err["loc"]]
    name = loc[0] if loc else "body"
    where = ".".join(loc)
    if err["type"] == "missing":
        return f"you must provide the '{where}' parameter"
    value = err.get("input")
    hint = f" ({_LIMITS[name]})" if name in _LIMITS and err["type"] == "less_than_equal" else ""
    return f"invalid value {value!r} for '{where}': {err['msg']}{hint}"

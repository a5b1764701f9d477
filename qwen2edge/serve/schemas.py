"""OpenAI request bodies: parsing, validation and the OpenAI error shape.

Requests are validated with pydantic, then every failure is turned into one `APIError` whose body is
OpenAI's `{"error": {"message", "type", "param", "code"}}`, so clients' error handling works unchanged.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

# Accepted for compatibility, ignored: they change nothing about the output.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "suffix"})
MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error answered with an OpenAI-style body and an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Common(BaseModel):
    """Fields shared by both endpoints, with OpenAI's ranges (plus top_k / repetition_penalty extensions)."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    n: StrictInt = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: Union[str, list[str], None] = None
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0)

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
    echo: bool = Field(default=False)
    logprobs: StrictInt | None = Field(default=None, le=0)
    best_of: StrictInt | None = Field(default=None, ge=1, le=1)

    def single_prompt(self) -> Union[str, list[int]]:
        """The one prompt of the request (text or token ids); batches of prompts are refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"got {len(p)} prompts; this server takes one prompt per request: send one "
                               "request per prompt (they are batched server-side)", param="prompt")
            p = p[0]
        if not p:
            raise APIError(400, "prompt is empty: give at least one character or token id", param="prompt")
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None

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


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: bool | None = Field(default=None)

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported by this server")
        return v

    def template_messages(self) -> list[dict[str, str]]:
        # "developer" is the newer name of "system"; chat templates only know the latter.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; raise APIError(400) naming the offending parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(400, _explain(err, body), param=param,
                       code="missing_required_parameter" if err["type"] == "missing" else "invalid_value") from None
    unknown = sorted(set(req.model_extra or {}) - IGNORED_FIELDS)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                       code="unrecognized_argument")
    return req


_UNSUPPORTED = {
    "n": "only n=1 is supported: send n separate requests",
    "best_of": "only best_of=1 is supported",
    "presence_penalty": "presence_penalty is not supported: use repetition_penalty instead",
    "frequency_penalty": "frequency_penalty is not supported: use repetition_penalty instead",
    "logit_bias": "logit_bias is not supported",
    "logprobs": "logprobs are not supported by this server",
}


def _explain(err: dict[str, Any], body: dict[str, Any]) -> str:
    loc = [str(x) for x in err["loc"]]
    name = loc[0] if loc else "body"
    where = ".".join(loc)
    if err["type"] == "missing":
        return f"you must provide the '{where}' parameter"
    if name in _UNSUPPORTED and name in body and err["type"] not in ("int_type", "bool_type", "dict_type"):
        return f"{_UNSUPPORTED[name]} (got {body[name]!r})"
    value = err.get("input")
    return f"invalid value {value!r} for '{where}': {err['msg']}"

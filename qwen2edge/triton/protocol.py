"""Triton's LLM tensor conventions (as its vLLM and TensorRT-LLM backends name them), defined once.

`INPUTS` / `OUTPUTS` render the model's config.pbtxt, and `parse_request` turns one request's input
tensors into token ids and SamplingParams, with errors that name the input tensor to fix. Pure numpy:
no Triton and no torch needed, so it is tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..runtime.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 128  # when a request gives no max_tokens (capped to the rest of the context)
# Library option names (errors' {opt:...}) whose input tensor is named differently.
TRITON_FIELDS = {"max_new_tokens": "max_tokens", "stop_strings": "stop", "prompt": "text_input"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the Triton model."""

    name: str
    data_type: str  # config.pbtxt spelling: TYPE_STRING is Triton's BYTES
    dims: tuple[int, ...]
    optional: bool = False


INPUTS = (
    TensorSpec("text_input", "TYPE_STRING", (1,)),
    TensorSpec("max_tokens", "TYPE_INT32", (1,), optional=True),
    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True),
    TensorSpec("top_p", "TYPE_FP32", (1,), optional=True),
    TensorSpec("top_k", "TYPE_INT32", (1,), optional=True),
    TensorSpec("repetition_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("seed", "TYPE_UINT64", (1,), optional=True),
    TensorSpec("stop", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("stream", "TYPE_BOOL", (1,), optional=True),
)
OUTPUTS = (
    TensorSpec("text_output", "TYPE_STRING", (1,)),
    TensorSpec("output_ids", "TYPE_INT64", (-1,)),
)


class RequestError(ValueError):
    """A request the model refuses; the message names the input tensor and the fix."""


@dataclass(frozen=True)
class TextRequest:
    """One parsed request: what to generate from, how, and whether to stream."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool


def _scalar(inputs: Mapping[str, np.ndarray], name: str) -> Any:
    """The single element of an optional input, or None when absent."""
    arr = inputs.get(name)
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.size != 1:
        raise RequestError(f"input '{name}' must hold exactly one value, got shape {list(arr.shape)}: "
                           f"send '{name}' with shape [1]")
    return arr.reshape(-1)[0]


def _text(value: Any, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{name}' is not valid UTF-8: send UTF-8 text") from None
    return str(value)


def _number(inputs: Mapping[str, np.ndarray], name: str, low: float, high: float, what: str,
            low_open: bool = False) -> float | None:
    value = _scalar(inputs, name)
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise RequestError(f"input '{name}' must be {what}, got {value:g}: fix '{name}'")
    return value


def _integer(inputs: Mapping[str, np.ndarray], name: str, low: int, what: str) -> int | None:
    value = _scalar(inputs, name)
    if value is None:
        return None
    value = int(value)
    if value < low:
        raise RequestError(f"input '{name}' must be {what}, got {value}: fix '{name}'")
    return value


def parse_request(inputs: Mapping[str, np.ndarray], tokenizer: Any, max_seq_len: int) -> TextRequest:
    """Validate one request's tensors ({name: numpy array}) and encode its prompt."""
    if inputs.get("text_input") is None:
        raise RequestError("input 'text_input' is missing: send the prompt text as 'text_input'")
    text = _text(_scalar(inputs, "text_input"), "text_input")
    if not text:
        raise RequestError("input 'text_input' is empty: send some prompt text")
    stops = inputs.get("stop")
    stop_strings = tuple(s for s in (_text(v, "stop") for v in np.asarray(stops).reshape(-1)) if s) \
        if stops is not None else ()
    temperature = _number(inputs, "temperature", 0.0, math.inf, ">= 0 (0 is greedy)")
    top_p = _number(inputs, "top_p", 0.0, 1.0, "in (0, 1]", low_open=True)
    penalty = _number(inputs, "repetition_penalty", 0.0, math.inf, "> 0 (1 disables it)", low_open=True)
    top_k = _integer(inputs, "top_k", 0, ">= 0 (0 disables it)")
    seed = _integer(inputs, "seed", 0, ">= 0")
    max_tokens = _integer(inputs, "max_tokens", 1, ">= 1")
    stream = _scalar(inputs, "stream")

    ids = tokenizer.encode(text)
    if not ids:
        raise RequestError("input 'text_input' encodes to no tokens: send some prompt text")
    room = max_seq_len - len(ids)
    if room < 1:
        raise RequestError(f"input 'text_input' is {len(ids)} tokens, the model's context is {max_seq_len}: "
                           "shorten the prompt")
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    elif max_tokens > room:
        raise RequestError(f"input 'text_input' ({len(ids)} tokens) + 'max_tokens' ({max_tokens}) exceeds the "
                           f"model's context of {max_seq_len} tokens: lower 'max_tokens' to at most {room}")
    params = SamplingParams(max_new_tokens=max_tokens,
                            temperature=0.0 if temperature is None else temperature,
                            top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
                            repetition_penalty=1.0 if penalty is None else penalty, seed=seed,
                            stop_strings=stop_strings)
    return TextRequest(ids, params, bool(stream) if stream is not None else False)


def config_tensors(kind: str, specs: tuple[TensorSpec, ...]) -> str:
    """The `input [...]` or `output [...]` block of config.pbtxt."""
    rows = []
    for s in specs:
        optional = " optional: true" if s.optional else ""
        dims = ", ".join(str(d) for d in s.dims)
        rows.append(f'  {{ name: "{s.name}" data_type: {s.data_type} dims: [ {dims} ]{optional} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]"

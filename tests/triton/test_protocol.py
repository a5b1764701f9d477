"""The Triton tensor conventions: request parsing (as Triton hands tensors to model.py) and config settings."""

from __future__ import annotations

import numpy as np
import pytest

from qwen2edge.errors import InputError
from qwen2edge.runtime.tokenizer import BundleTokenizer
from qwen2edge.triton.config import ModelSettings, render_config
from qwen2edge.triton.protocol import DEFAULT_MAX_TOKENS, INPUTS, RequestError, parse_request

CONTEXT = 96


@pytest.fixture(scope="module")
def tokenizer(tiny_bundle_factory) -> BundleTokenizer:
    return BundleTokenizer.from_dir(tiny_bundle_factory("gqa")[1])


def text(value: str | bytes) -> np.ndarray:
    return np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)


def test_defaults_are_greedy_unstreamed_and_fit_the_context(tokenizer):
    req = parse_request({"text_input": text("Hello there")}, tokenizer, CONTEXT)
    assert req.prompt_ids == tokenizer.encode("Hello there") and req.stream is False
    p = req.params
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed, p.stop_strings) == (0.0, 0, 1.0, 1.0, None, ())
    assert p.max_new_tokens == min(DEFAULT_MAX_TOKENS, CONTEXT - len(req.prompt_ids))


def test_every_input_reaches_the_sampling_params(tokenizer):
    req = parse_request({"text_input": text("Hi"), "max_tokens": np.array([7], np.int32),
                         "temperature": np.array([0.7], np.float32), "top_p": np.array([0.9], np.float32),
                         "top_k": np.array([40], np.int32), "repetition_penalty": np.array([1.1], np.float32),
                         "seed": np.array([2**40], np.uint64), "stop": np.array([b"\n", b"", b"END"], np.object_),
                         "stream": np.array([True])}, tokenizer, CONTEXT)
    p = req.params
    assert (p.max_new_tokens, p.top_k, p.seed, p.stop_strings, req.stream) == (7, 40, 2**40, ("\n", "END"), True)
    assert (p.temperature, p.top_p, p.repetition_penalty) == pytest.approx((0.7, 0.9, 1.1))


@pytest.mark.parametrize("inputs, needle", [
    ({}, "input 'text_input' is missing"),
    ({"text_input": text("")}, "input 'text_input' is empty"),
    ({"text_input": text(b"\xff\xfe")}, "input 'text_input' is not valid UTF-8"),
    ({"text_input": np.array([b"a", b"b"], np.object_)}, "input 'text_input' must hold exactly one value"),
    ({"text_input": text("hi"), "max_tokens": np.array([0], np.int32)}, "input 'max_tokens' must be >= 1, got 0"),
    ({"text_input": text("hi"), "temperature": np.array([-0.5], np.float32)}, "input 'temperature' must be >= 0"),
    ({"text_input": text("hi"), "temperature": np.array([np.nan], np.float32)}, "input 'temperature' must be"),
    ({"text_input": text("hi"), "top_p": np.array([1.5], np.float32)}, "input 'top_p' must be in (0, 1]"),
    ({"text_input": text("hi"), "top_p": np.array([0.0], np.float32)}, "input 'top_p' must be in (0, 1]"),
    ({"text_input": text("hi"), "top_k": np.array([-1], np.int32)}, "input 'top_k' must be >= 0"),
    ({"text_input": text("hi"), "repetition_penalty": np.array([0], np.float32)}, "'repetition_penalty' must be > 0"),
    ({"text_input": text("hi"), "stop": np.array([b"\xff"], np.object_)}, "input 'stop' is not valid UTF-8"),
])
def test_bad_inputs_name_the_tensor(inputs, needle, tokenizer):
    with pytest.raises(RequestError) as exc:
        parse_request(inputs, tokenizer, CONTEXT)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_the_context_bounds_prompt_and_max_tokens(tokenizer):
    n = len(tokenizer.encode("Hello there"))
    ok = parse_request({"text_input": text("Hello there"), "max_tokens": np.array([CONTEXT - n], np.int32)},
                       tokenizer, CONTEXT)
    assert ok.params.max_new_tokens == CONTEXT - n
    with pytest.raises(RequestError, match=f"lower 'max_tokens' to at most {CONTEXT - n}"):
        parse_request({"text_input": text("Hello there"), "max_tokens": np.array([CONTEXT - n + 1], np.int32)},
                      tokenizer, CONTEXT)
    with pytest.raises(RequestError, match="shorten the prompt"):
        parse_request({"text_input": text("word " * CONTEXT)}, tokenizer, CONTEXT)


def test_settings_travel_through_the_config_parameters():
    settings = ModelSettings(bundle="/b/x y", backend="trt", max_batch=3, threads=2, streaming=False)
    assert ModelSettings.from_parameters(settings.to_parameters()) == settings
    assert ModelSettings.from_parameters({"qwen2edge_bundle": "b"}) == ModelSettings(bundle="b")
    with pytest.raises(InputError, match="qwen2edge_max_batch is 'x', not a valid int"):
        ModelSettings.from_parameters({"qwen2edge_bundle": "b", "qwen2edge_max_batch": "x"})
    with pytest.raises(InputError, match="no qwen2edge_bundle parameter"):
        ModelSettings.from_parameters({})
    with pytest.raises(InputError, match="max_batch must be at least 1"):
        ModelSettings(bundle="b", max_batch=0)


def test_config_declares_every_input_the_backend_kind_and_the_policy():
    text_ = render_config("m", ModelSettings(bundle='/a "q"/b', backend="trt", streaming=False), 3, "/p")
    for spec in INPUTS:
        assert f'name: "{spec.name}" data_type: {spec.data_type}' in text_
    assert "instance_group [ { count: 3 kind: KIND_GPU } ]" in text_
    assert "model_transaction_policy { decoupled: false }" in text_
    assert 'string_value: "/a \\"q\\"/b"' in text_  # quoted as protobuf text format reads it


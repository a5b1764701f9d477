"""`qwen2edge serve` bad arguments, and the default model answering through the server."""

from __future__ import annotations

import socket

import openai
import pytest

from ..test_cli import assert_one_line_error, run_cli
from .conftest import ServerProcess
from qwen2edge.errors import InputError


def test_serve_refuses_a_busy_port_in_one_line(tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", str(bundle), "--port", str(port), block_torch=True, timeout=120)
    assert_one_line_error(proc, InputError.exit_code, f"cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("args, needle", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--api-key", ""], "--api-key is empty"),  # once served without authentication, silently
    (["--api-key", "  "], "--api-key is empty"),
])
def test_serve_bad_options(args, needle, tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    assert_one_line_error(run_cli("serve", str(bundle), *args, block_torch=True), InputError.exit_code, needle)


def test_serve_missing_bundle(tmp_path):
    proc = run_cli("serve", str(tmp_path / "nope"), "--port", "0", block_torch=True)
    assert_one_line_error(proc, InputError.exit_code, "does not exist")


@pytest.mark.slow
def test_default_model_answers_paris(smollm2_bundle):
    server = ServerProcess(smollm2_bundle, "--served-model-name", "smollm2")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        out = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32, temperature=0)
        assert "Paris" in out.choices[0].message.content, out.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=32, temperature=0, stream=True))
        assert streamed == out.choices[0].message.content
    finally:
        assert server.stop() == 0, server.log()

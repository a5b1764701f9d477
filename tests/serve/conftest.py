"""Real `qwen2edge serve` subprocesses on 127.0.0.1 (torch imports blocked), shared per module."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from ..test_cli import BLOCK_TORCH

API_KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`qwen2edge serve BUNDLE ...` with torch/transformers made unimportable, until stop()."""

    def __init__(self, bundle: Path, *args: str, ready_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = Path(bundle).resolve().name
        self._log = tempfile.NamedTemporaryFile("w+", prefix="qwen2edge-serve-", suffix=".log", delete=False)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", BLOCK_TORCH, "serve", str(bundle), "--port",
                                      str(self.port), *args], stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become ready in {ready_timeout} s:\n{self.log()}")

    def log(self) -> str:
        return Path(self._log.name).read_text()

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][^ ]*) ([0-9.eE+-]+|NaN|\+Inf)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def tiny_server(tiny_bundle_factory):
    """The tiny GQA model (context 96), API key set, 2 workers x batches of 8."""
    _, bundle = tiny_bundle_factory("gqa")
    server = ServerProcess(bundle, "--api-key", API_KEY, "--max-concurrency", "16", "--max-batch", "8",
                           "--max-queue", "64")
    yield server
    assert server.stop() == 0, server.log()


LONG_CONTEXT = 4096
LONG_ANSWER = 4000  # max_tokens of a request meant to still be generating when the test acts


@pytest.fixture(scope="module")
def long_bundle(tiny_bundle_factory) -> Path:
    """The tiny GQA model with a 4096-token context: generations of several seconds for the
    queue/disconnect/shutdown tests (480 tokens took 0.7 s, which lost a race with a 0.5 s client timeout)."""
    return tiny_bundle_factory("gqa_4k", max_seq_len=LONG_CONTEXT)[1]


@pytest.fixture(scope="module")
def one_slot_server(long_bundle):
    """One generation at a time, one waiting: the smallest server that can be full."""
    server = ServerProcess(long_bundle, "--max-concurrency", "1", "--max-batch", "1", "--max-queue", "1")
    yield server
    assert server.stop(signal.SIGINT) == 0, server.log()  # Ctrl-C is a clean stop too

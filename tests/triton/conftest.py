"""A real tritonserver (from the nvidia-pytriton wheel) serving the tiny model through `qwen2edge triton-repo`.

The wheel is cached in $QWEN2EDGE_TRITON_CACHE or .cache/triton under the repository (CI fetches it
there first); the tests skip only when downloading it fails.
"""

from __future__ import annotations

import json
import os
import queue
from pathlib import Path

import httpx
import numpy as np
import pytest

from ..test_cli import run_cli
from qwen2edge.triton.local import DownloadFailed, TritonInstall, TritonServer

CACHE = Path(os.environ.get("QWEN2EDGE_TRITON_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "triton"))
STREAMING = "tiny"  # decoupled (streaming), 1 instance
PAIR = "tiny_pair"  # --no-streaming (plain /infer works), 2 instances of 1 thread each, --copy-bundle
PROMPT = "Hello there, how are"
MAX_TOKENS = 12


@pytest.fixture(scope="session")
def triton_install() -> TritonInstall:
    try:
        return TritonInstall.prepare(CACHE)
    except DownloadFailed as exc:
        pytest.skip(f"no tritonserver to test against: {exc}")


def write_repo(bundle: Path, out: Path, *args: str) -> Path:
    """`qwen2edge triton-repo` as a user runs it, torch imports blocked."""
    proc = run_cli("triton-repo", str(bundle), "-o", str(out), *args, block_torch=True)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def triton_bundle(tiny_bundle_factory) -> Path:
    return tiny_bundle_factory("gqa")[1]


@pytest.fixture(scope="module")
def triton_server(triton_install, triton_bundle, tmp_path_factory):
    """One server over two repositories, STREAMING and PAIR, for test_server.py (module scope: stopped as soon
    as that module is done, not at the end of the suite). Must stop cleanly (exit 0)."""
    root = tmp_path_factory.mktemp("triton")
    one = write_repo(triton_bundle, root / "repo-streaming", "--name", STREAMING, "--max-batch", "4")
    two = write_repo(triton_bundle, root / "repo-pair", "--name", PAIR, "--instances", "2", "--max-batch", "4",
                     "--threads", "1", "--no-streaming", "--copy-bundle")
    server = TritonServer(triton_install, one, root / "tritonserver.log", f"--model-repository={two}")
    yield server
    code = server.stop()
    assert code == 0 and "Exit timeout expired" not in server.log(), server.log()[-3000:]


@pytest.fixture(scope="session")
def cli_generate(triton_bundle):
    """(prompt, max_tokens) -> `qwen2edge generate --json` output (greedy), run once each."""
    cache: dict = {}

    def get(prompt: str = PROMPT, max_tokens: int = MAX_TOKENS) -> dict:
        key = (prompt, max_tokens)
        if key not in cache:
            proc = run_cli("generate", str(triton_bundle), "--prompt", prompt, "--max-new-tokens", str(max_tokens),
                           "--json", block_torch=True)
            assert proc.returncode == 0, proc.stderr
            cache[key] = json.loads(proc.stdout)
        return cache[key]

    return get


# ---- clients -----------------------------------------------------------------------------------

def as_list(value) -> list:
    """Triton's generate endpoint unwraps one-element tensors to a scalar."""
    return value if isinstance(value, list) else [value]


def generate(server: TritonServer, model: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/generate", json=body, timeout=timeout)


def generate_stream(server: TritonServer, model: str, body: dict) -> tuple[list[dict], int]:
    """The SSE events of /generate_stream, and how many network chunks carried them."""
    events, chunks, buf = [], 0, ""
    with httpx.stream("POST", f"{server.url}/v2/models/{model}/generate_stream", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for chunk in resp.iter_text():
            chunks += 1
            buf += chunk
            while "\n\n" in buf:
                event, buf = buf.split("\n\n", 1)
                assert event.startswith("data: "), event
                events.append(json.loads(event[6:]))
    return events, chunks


def grpc_inputs(prompt, max_tokens: int, stream: bool | None = None, **extra):
    """tritonclient gRPC inputs following the model's tensor conventions."""
    import tritonclient.grpc as grpcclient

    values = {"text_input": np.array([prompt.encode() if isinstance(prompt, str) else prompt], dtype=np.object_),
              "max_tokens": np.array([max_tokens], dtype=np.int32), **extra}
    if stream is not None:
        values["stream"] = np.array([stream], dtype=bool)
    types = {np.dtype(np.object_): "BYTES", np.dtype(np.int32): "INT32", np.dtype(bool): "BOOL",
             np.dtype(np.float32): "FP32", np.dtype(np.uint64): "UINT64"}
    inputs = []
    for name, arr in values.items():
        inp = grpcclient.InferInput(name, list(arr.shape), types[arr.dtype])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def grpc_stream(server: TritonServer, model: str, inputs, timeout: float = 120) -> list:
    """Every response of one request over a gRPC stream: (text, ids, final) tuples, or the error raised."""
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(model, inputs, request_id="1", enable_empty_final_response=True)
        out = []
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise error
            final = result.get_response().parameters["triton_final_response"].bool_param
            out.append((result.as_numpy("text_output")[0].decode(), result.as_numpy("output_ids").tolist(), final))
            if final:
                return out
    finally:
        client.stop_stream()
        client.close()


def stubs(server: TritonServer, model: str) -> dict[str, tuple[int, int]]:
    """{instance name: (pid, CPU ticks)} of the server's Python backend stub processes for `model` (Linux)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if argv[0].endswith(b"triton_python_backend_stub") and stat[0] != "Z" and int(stat[1]) == server.proc.pid:
            name = argv[8].decode()  # e.g. tiny_pair_0_1
            if name.startswith(f"{model}_"):
                out[name] = (int(pid), int(stat[11]) + int(stat[12]))  # utime + stime
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

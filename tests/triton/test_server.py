"""qwen2edge on a real tritonserver: generate / generate_stream, tritonclient over HTTP and gRPC streaming,
concurrency, two instances, malformed requests, shutdown."""

from __future__ import annotations

import json
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from .conftest import (MAX_TOKENS, alive, PAIR, PROMPT, STREAMING, as_list, generate, generate_stream, grpc_inputs,
                       grpc_stream, stubs, write_repo)
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.sampling import SamplingParams
from qwen2edge.triton.local import TritonServer, TritonUnavailable
from qwen2edge.triton.protocol import INPUTS, OUTPUTS


@pytest.mark.parametrize("model", [STREAMING, PAIR])
def test_generate_endpoint_matches_cli(model, triton_server, cli_generate):
    expected = cli_generate()
    resp = generate(triton_server, model, {"text_input": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["text_output"] == expected["text"]
    assert as_list(body["output_ids"]) == expected["token_ids"]


def test_generate_stream_sends_text_as_it_is_produced(triton_server, cli_generate):
    expected = cli_generate(PROMPT, 40)
    events, chunks = generate_stream(triton_server, STREAMING, {"text_input": PROMPT, "max_tokens": 40,
                                                                "temperature": 0, "stream": True})
    *deltas, last = events
    assert len(deltas) >= 10 and all(e["text_output"] for e in deltas)  # one event per text piece
    assert chunks > 1  # written as produced, not buffered into one body
    assert "".join(e["text_output"] for e in deltas) + last["text_output"] == expected["text"]
    assert all(as_list(e["output_ids"]) == [] for e in deltas) and as_list(last["output_ids"]) == expected["token_ids"]


def test_generate_stream_without_stream_flag_is_one_event(triton_server, cli_generate):
    events, _ = generate_stream(triton_server, STREAMING, {"text_input": PROMPT, "max_tokens": MAX_TOKENS})
    assert len(events) == 1 and events[0]["text_output"] == cli_generate()["text"]


def test_tritonclient_grpc_stream_matches_cli(triton_server, cli_generate):
    expected = cli_generate()
    responses = grpc_stream(triton_server, STREAMING, grpc_inputs(PROMPT, MAX_TOKENS, stream=True))
    assert len(responses) > 2 and [final for *_, final in responses] == [False] * (len(responses) - 1) + [True]
    assert "".join(text for text, _, _ in responses) == expected["text"]
    assert sum((ids for _, ids, _ in responses), []) == expected["token_ids"]


def test_tritonclient_http_infer_matches_cli(triton_server, cli_generate):
    import tritonclient.http as httpclient

    expected = cli_generate()
    client = httpclient.InferenceServerClient(triton_server.url.removeprefix("http://"))
    try:
        inputs = []
        for name, arr, dtype in [("text_input", np.array([PROMPT.encode()], dtype=np.object_), "BYTES"),
                                 ("max_tokens", np.array([MAX_TOKENS], dtype=np.int32), "INT32")]:
            inputs.append(httpclient.InferInput(name, [1], dtype))
            inputs[-1].set_data_from_numpy(arr)
        result = client.infer(PAIR, inputs)
        assert result.as_numpy("text_output")[0].decode() == expected["text"]
        assert result.as_numpy("output_ids").tolist() == expected["token_ids"]
        # What triton-repo declared is what the server runs.
        meta = client.get_model_metadata(STREAMING)
        assert [i["name"] for i in meta["inputs"]] == [s.name for s in INPUTS]
        assert [o["name"] for o in meta["outputs"]] == [s.name for s in OUTPUTS]
        streaming, pair = client.get_model_config(STREAMING), client.get_model_config(PAIR)
        assert streaming["model_transaction_policy"]["decoupled"] is True
        assert pair["model_transaction_policy"].get("decoupled", False) is False
        assert [(g["count"], g["kind"]) for g in pair["instance_group"]] == [(2, "KIND_CPU")]
    finally:
        client.close()  # an open keep-alive connection would hold up the server's shutdown


def test_concurrent_clients_get_their_own_results(triton_server, triton_bundle):
    """Requests batched together (greedy and seeded sampling, different lengths) each get what they would
    alone."""
    cases = [({"text_input": f"Question {i}: what is {i} plus {i}?", "max_tokens": 8 + 3 * i} |
              ({"temperature": 0.8, "top_k": 50, "seed": i} if i % 2 else {})) for i in range(8)]
    bundle = Bundle.open(triton_bundle)
    gen = bundle.generator()
    expected = []
    for case in cases:
        params = SamplingParams(max_new_tokens=case["max_tokens"], temperature=case.get("temperature", 0.0),
                                top_k=case.get("top_k", 0), seed=case.get("seed"))
        expected.append(gen.generate([bundle.tokenizer.encode(case["text_input"])], params)[0][0])
    with ThreadPoolExecutor(len(cases)) as pool:
        bodies = list(pool.map(lambda c: generate(triton_server, STREAMING, c), cases))
    for resp, want in zip(bodies, expected):
        assert resp.status_code == 200, resp.text
        assert (resp.json()["text_output"], as_list(resp.json()["output_ids"])) == (want.text, want.token_ids)


def test_two_instances_share_the_load(triton_server, cli_generate):
    expected = cli_generate(PROMPT, 60)
    before = stubs(triton_server, PAIR)
    assert sorted(before) == [f"{PAIR}_0_0", f"{PAIR}_0_1"]
    with ThreadPoolExecutor(12) as pool:
        bodies = list(pool.map(lambda _: generate(triton_server, PAIR, {"text_input": PROMPT, "max_tokens": 60}),
                               range(12)))
    assert all(r.status_code == 200 and r.json()["text_output"] == expected["text"] for r in bodies)
    after = stubs(triton_server, PAIR)
    busy = {name: after[name][1] - before[name][1] for name in before}
    assert all(ticks >= 10 for ticks in busy.values()), busy  # both generated (>= 0.1 s of CPU each)


MALFORMED = [
    ({"max_tokens": 4}, "'text_input' is missing"),
    ({"text_input": "", "max_tokens": 4}, "'text_input' is empty"),
    ({"text_input": "hi", "max_tokens": 0}, "'max_tokens' must be >= 1"),
    ({"text_input": "hi", "max_tokens": 500}, "lower 'max_tokens' to at most"),
    ({"text_input": "hi", "seed": -1}, "Unable to parse"),  # UINT64: Triton's own type check
    ({"text_input": "hi", "temperature": -1.0}, "'temperature' must be >= 0"),
    ({"text_input": "hi", "top_p": 0.0}, "'top_p' must be in (0, 1]"),
    ({"text_input": "hi", "top_k": -2}, "'top_k' must be >= 0"),
    ({"text_input": "hi", "repetition_penalty": 0.0}, "'repetition_penalty' must be > 0"),
    ({"text_input": "hi", "max_tokens": "many"}, "Unable to parse"),  # refused by Triton itself
]


@pytest.mark.parametrize("model", [STREAMING, PAIR])
def test_malformed_requests_get_errors_and_the_server_keeps_serving(model, triton_server, cli_generate):
    before = {name: pid for name, (pid, _) in stubs(triton_server, model).items()}
    for body, needle in MALFORMED:
        resp = generate(triton_server, model, body)
        assert resp.status_code in (400, 500) and needle in resp.json()["error"], (body, resp.text)
    if model == PAIR:
        resp = generate(triton_server, PAIR, {"text_input": "hi", "stream": True})
        assert resp.status_code == 400 and "--no-streaming" in resp.json()["error"], resp.text
    else:  # invalid UTF-8 can only come as raw bytes: over gRPC
        with pytest.raises(InferenceServerException, match="input 'text_input' is not valid UTF-8"):
            grpc_stream(triton_server, STREAMING, grpc_inputs(b"\xff\xfe", 4, stream=True))
    ok = generate(triton_server, model, {"text_input": PROMPT, "max_tokens": MAX_TOKENS})
    assert ok.status_code == 200 and ok.json()["text_output"] == cli_generate()["text"]
    after = {name: pid for name, (pid, _) in stubs(triton_server, model).items()}
    assert after == before  # no instance crashed or was restarted


def test_a_cancelled_request_frees_its_row(triton_install, tiny_bundle_factory, tmp_path):
    """One row: a 4000-token generation would hold it for many seconds, unless cancelling it (gRPC stream
    cancel, or an HTTP client going away) stops it."""
    _, bundle = tiny_bundle_factory("gqa_4k", max_seq_len=4096)
    repo = write_repo(bundle, tmp_path / "repo", "--name", "one", "--max-batch", "1")
    with TritonServer(triton_install, repo, tmp_path / "server.log") as server:
        import tritonclient.grpc as grpcclient

        first: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error: first.put(error))
        client.async_stream_infer("one", grpc_inputs(PROMPT, 4000, stream=True), request_id="long")
        assert first.get(timeout=60) is None
        client.stop_stream(cancel_requests=True)
        client.close()
        t0 = time.monotonic()
        assert generate(server, "one", {"text_input": PROMPT, "max_tokens": 4}).status_code == 200
        assert time.monotonic() - t0 < 5, server.log()[-2000:]

        with httpx.stream("POST", f"{server.url}/v2/models/one/generate_stream", timeout=60,
                          json={"text_input": PROMPT, "max_tokens": 4000, "stream": True}) as resp:
            next(line for line in resp.iter_lines() if line.startswith("data: "))  # then hang up
        t0 = time.monotonic()
        assert generate(server, "one", {"text_input": PROMPT, "max_tokens": 4}).status_code == 200
        assert time.monotonic() - t0 < 5, server.log()[-2000:]


def test_shutdown_finishes_requests_in_flight_and_exits_cleanly(triton_install, tiny_bundle_factory, tmp_path):
    """SIGTERM (what Kubernetes sends) with a long stream in flight: the stream completes, the stubs exit,
    tritonserver exits 0 without hitting its exit timeout."""
    _, bundle = tiny_bundle_factory("gqa_4k", max_seq_len=4096)
    repo = write_repo(bundle, tmp_path / "repo", "--name", "long", "--max-batch", "2")
    server = TritonServer(triton_install, repo, tmp_path / "server.log", "--exit-timeout-secs=60")
    try:
        events: list = []
        first = threading.Event()

        def client() -> None:
            with httpx.stream("POST", f"{server.url}/v2/models/long/generate_stream", timeout=120,
                              json={"text_input": PROMPT, "max_tokens": 300, "stream": True}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        first.set()

        thread = threading.Thread(target=client)
        thread.start()
        assert first.wait(60), server.log()[-2000:]
        running = stubs(server, "long")
        server.proc.send_signal(signal.SIGTERM)
        thread.join(120)
        code = server.stop()
    finally:
        server.stop()
    assert code == 0 and "Exit timeout expired" not in server.log(), server.log()[-3000:]
    assert "error" not in events[-1] and len(as_list(events[-1]["output_ids"])) > 0, events[-1]
    assert running and not any(alive(pid) for pid, _ in running.values())  # no stub left behind


def test_a_bundle_corrupted_after_writing_fails_to_load(triton_install, triton_bundle, tmp_path):
    repo = write_repo(triton_bundle, tmp_path / "repo", "--name", "corrupt", "--copy-bundle")
    tok = repo / "corrupt" / "1" / "bundle" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"', "'", 1))
    with pytest.raises(TritonUnavailable, match="tokenizer.json fails its manifest checksum"):
        TritonServer(triton_install, repo, tmp_path / "server.log").stop()

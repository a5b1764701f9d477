"""`qwen2edge serve` with speculation, the prefix cache and chunked prefill: greedy answers equal the library's
plain generation, in both batching modes, and /metrics shows each mechanism ran (real servers, no torch)."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.sampling import SamplingParams

from .conftest import ServerProcess

SYSTEM = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
PROMPTS = [SYSTEM + [9707, 11, 1879, 0, 9707, 11, 1879], SYSTEM + [40, 1079, 264, 1273, 13, 40, 1079],
           [3838, 25, 3838, 25, 3838], SYSTEM + [3838, 25, 3838, 25] * 3]


@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle_factory):
    return tiny_bundle_factory("gqa")[1]


@pytest.fixture(scope="module")
def plain(bundle_dir):
    gen = Bundle.open(bundle_dir).generator()
    return lambda ids, n: gen.generate([ids], SamplingParams(max_new_tokens=n))[0][0]


def _complete(server, ids, n):
    body = {"model": server.model, "prompt": ids, "max_tokens": n, "temperature": 0}
    resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def _concurrently(server, jobs):
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda job: _complete(server, *job), jobs))


def test_in_flight_server_with_every_speedup_answers_as_plain_generation(bundle_dir, plain):
    server = ServerProcess(bundle_dir, "--speculative", "prompt-lookup", "--num-speculative-tokens", "3",
                           "--ngram", "2", "--prefix-cache-mb", "16", "--prefill-chunk", "8", "--max-batch", "4")
    try:
        jobs = [(PROMPTS[0], 24), (PROMPTS[1], 30), (PROMPTS[2], 20), (PROMPTS[3], 16)]
        assert _concurrently(server, jobs) == [plain(ids, n).text for ids, n in jobs]
        first = plain(PROMPTS[0], 24)
        turn2 = PROMPTS[0] + first.token_ids + [151645, 198, 151644, 872, 198, 40, 1079]
        assert _complete(server, turn2, 12) == plain(turn2, 12).text
        # A request with logprobs and a logit_bias speculates too: the same text, and one record per token
        # equal to plain generation's.
        want = Bundle.open(bundle_dir).generator().generate(
            [PROMPTS[1]], SamplingParams(max_new_tokens=20, logprobs=2, logit_bias={1079: 2.0}))[0][0]
        body = {"model": server.model, "prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0, "logprobs": 2,
                "logit_bias": {"1079": 2.0}}
        resp = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        assert choice["text"] == want.text
        assert choice["logprobs"]["token_logprobs"] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-4)
        metrics = server.metrics()
        assert metrics["qwen2edge_prefix_cache_reused_tokens_total"] >= len(PROMPTS[0]) + len(first.token_ids) - 1
        assert metrics['qwen2edge_speculative_tokens_total{kind="drafted"}'] > 0
    finally:
        assert server.stop() == 0, server.log()


def test_static_batches_speculate_with_a_draft_bundle(bundle_dir, plain):
    server = ServerProcess(bundle_dir, "--batching", "static", "--draft", str(bundle_dir), "--max-batch", "4")
    try:
        jobs = [(PROMPTS[0], 20), (PROMPTS[2], 12), (PROMPTS[1], 16)]
        assert _concurrently(server, jobs) == [plain(ids, n).text for ids, n in jobs]
        metrics = server.metrics()
        drafted = metrics['qwen2edge_speculative_tokens_total{kind="drafted"}']
        assert drafted > 0 and metrics['qwen2edge_speculative_tokens_total{kind="accepted"}'] == drafted
    finally:
        assert server.stop() == 0, server.log()


def test_bad_speedup_options_are_refused_before_serving(bundle_dir, tiny_bundle_factory):
    from ..test_cli import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("serve", str(bundle_dir), "--prefix-cache-mb", "-1"), 2, "--prefix-cache-mb must be >= 0")
    assert_one_line_error(run_cli("serve", str(bundle_dir), "--speculative", "draft"), 2, "pass --draft DRAFT_BUNDLE")

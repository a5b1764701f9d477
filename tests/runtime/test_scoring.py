"""Prompt and generated-token log-probabilities equal transformers' log-softmax (tiny random models, fp32)."""

from __future__ import annotations

import numpy as np
import pytest

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.sampling import SamplingParams
from qwen2edge.runtime.scoring import prompt_logprobs

TOL = 2e-3


def _reference(hf, ids: list[int]) -> np.ndarray:
    import torch

    return torch.log_softmax(torch.tensor(hf.logits(ids), dtype=torch.float64), dim=-1).numpy()


@pytest.mark.parametrize("variant", ["gqa", "mqa_tied"])
def test_prompt_logprobs_equal_transformers_for_any_chunking(variant, tiny_bundle_factory, hf_reference_factory):
    model_dir, bundle_dir = tiny_bundle_factory(variant)
    gen = Bundle.open(bundle_dir).generator()
    ids = gen.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs far away home.")
    ref = _reference(hf_reference_factory(model_dir), ids)
    whole = prompt_logprobs(gen, ids, top_n=4)
    assert whole[0] is None and len(whole) == len(ids)
    for i in range(1, len(ids)):
        assert whole[i].token == ids[i]
        assert abs(whole[i].logprob - ref[i - 1, ids[i]]) < TOL
        best = np.argsort(-ref[i - 1], kind="stable")[:4]
        assert np.allclose([lp for _, lp in whole[i].top], ref[i - 1, best], atol=TOL)
    chunked = prompt_logprobs(gen, ids, top_n=4, chunk=5)  # later chunks attend the cache earlier ones wrote
    for a, b in zip(chunked[1:], whole[1:]):
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_generated_logprobs_equal_transformers(tiny_bundle_factory, hf_reference_factory):
    model_dir, bundle_dir = tiny_bundle_factory("gqa")
    gen = Bundle.open(bundle_dir).generator()
    prompt = gen.tokenizer.encode("Once upon a time")
    out, _ = gen.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0.8, seed=5, logprobs=3,
                                                   stop_token_ids=(-1,)))
    tokens, entries = out[0].token_ids, out[0].logprobs
    assert [e.token for e in entries] == tokens and len(tokens) == 12
    ref = _reference(hf_reference_factory(model_dir), prompt + tokens)
    for i, e in enumerate(entries):
        row = ref[len(prompt) - 1 + i]
        assert abs(e.logprob - row[e.token]) < TOL  # raw model log-probabilities, not the tempered ones
        assert np.allclose([lp for _, lp in e.top], np.sort(row)[::-1][:3], atol=TOL)

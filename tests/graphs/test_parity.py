"""Exported tiny Qwen2 variants vs transformers: prefill logits, decode steps, greedy tokens."""

import numpy as np
import pytest

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.sampling import SamplingParams
from qwen2edge.validation.engine import teacher_forced

from ..conftest import TINY_VARIANTS

PROMPTS = [[151644, 872, 198, 9707, 0, 11, 1879, 30], [40, 1079, 264, 1273, 13], [3838]]


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_prefill_and_decode_logits_match_transformers(variant, tiny_bundle_factory, hf_reference_factory):
    model_dir, bundle_dir = tiny_bundle_factory(variant)
    ref = hf_reference_factory(model_dir)
    gen = Bundle.open(bundle_dir).generator()
    prompt = PROMPTS[0]
    forced = ref.greedy(prompt, 12)
    want = ref.logits(prompt + forced)[: len(prompt) + len(forced)]
    got = teacher_forced(gen, prompt, forced)
    assert got.shape == want.shape
    assert np.abs(got[: len(prompt)] - want[: len(prompt)]).max() < 1e-4  # prefill
    assert np.abs(got[len(prompt):] - want[len(prompt):]).max() < 1e-4  # cached decode steps
    assert np.abs(want).max() > 0.5  # the model is not degenerate, so the bound means something


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_32_greedy_tokens_identical(variant, tiny_bundle_factory, hf_reference_factory):
    model_dir, bundle_dir = tiny_bundle_factory(variant)
    ref = hf_reference_factory(model_dir)
    gen = Bundle.open(bundle_dir).generator()
    for prompt in PROMPTS:
        results, _ = gen.generate([prompt], SamplingParams(max_new_tokens=32, stop_token_ids=(-1,)))
        assert results[0].token_ids == ref.greedy(prompt, 32)


DCA_IDS = [int(x) for x in np.random.default_rng(7).integers(0, 151000, size=35)]


@pytest.mark.parametrize("variant, prompts, new_tokens", [
    ("gqa", PROMPTS, 16),
    ("dca", [DCA_IDS[:30], DCA_IDS[30:35]], 20),  # rows in different DCA chunks (period 12)
])
def test_padded_batch_equals_single_requests(variant, prompts, new_tokens, tiny_bundle_factory):
    _, bundle_dir = tiny_bundle_factory(variant)
    gen = Bundle.open(bundle_dir).generator()
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=(-1,))
    batch, _ = gen.generate(prompts, params)
    for prompt, row in zip(prompts, batch):
        single, _ = gen.generate([prompt], params)
        assert row.token_ids == single[0].token_ids


def test_prefill_in_two_chunks_equals_one_prefill(tiny_bundle_factory):
    """The cache written by one prefill is consumed exactly by a second multi-token step."""
    from qwen2edge import io_spec
    from qwen2edge.runtime.generator import prefill_feed

    _, bundle_dir = tiny_bundle_factory("mqa")
    bundle = Bundle.open(bundle_dir)
    backend, L = bundle.backend("ort"), bundle.max_seq_len
    prompt = PROMPTS[0]
    whole = teacher_forced(bundle.generator(backend), prompt, [0])[: len(prompt)]
    cache = backend.new_cache(1)
    head, tail = prompt[:3], prompt[3:]
    feed = prefill_feed([head], L, 0)
    backend.step(cache, feed, np.zeros(1, dtype=np.int64))
    t = len(tail)
    mask = np.zeros((1, L + t), dtype=np.int64)
    mask[0, :3] = 1
    mask[0, L:] = 1
    feed2 = {io_spec.INPUT_IDS: np.array([tail]), io_spec.POSITION_IDS: np.arange(3, 3 + t)[None],
             io_spec.ATTENTION_MASK: mask, io_spec.LOGITS_INDEX: np.arange(t)[None]}
    got = backend.step(cache, feed2, np.array([3]))[0]
    np.testing.assert_allclose(got, whole[3:], atol=1e-4)

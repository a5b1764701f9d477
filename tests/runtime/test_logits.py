"""Per-row logits processing (OpenAI penalties, logit_bias, min_tokens, ignore_eos) and log-probabilities, on
hand-made logits and on the tiny model's generator."""

from __future__ import annotations

import numpy as np
import pytest

from qwen2edge.errors import InputError
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.logits import RowLogits, log_softmax, token_logprob, top_logprobs
from qwen2edge.runtime.sampling import SamplingParams

PROMPT = [9707, 11, 1879]


def _logits(values) -> np.ndarray:
    return np.asarray([values], dtype=np.float32)


def test_openai_penalty_formula():
    """logit[j] -= count[j] * frequency + (count[j] > 0) * presence, over generated tokens only."""
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    proc = RowLogits(params, stop_ids=())
    for tok in (1, 1, 1, 3):
        proc.observe(tok)
    out = proc.process(_logits([1.0, 2.0, 3.0, 4.0, 5.0]), history=[0, 1, 1, 1, 3], generated=4)
    assert out[0].tolist() == pytest.approx([1.0, 2.0 - 3 * 0.25 - 0.5, 3.0, 4.0 - 0.25 - 0.5, 5.0])
    # Negative penalties favour repeats, as OpenAI allows (-2..2).
    neg = RowLogits(SamplingParams(presence_penalty=-1.0), stop_ids=())
    neg.observe(4)
    assert neg.process(_logits([0.0] * 5), history=[4], generated=1)[0, 4] == pytest.approx(1.0)


def test_logit_bias_min_tokens_and_untouched_rows():
    params = SamplingParams(logit_bias={2: 100, 0: -100}, min_tokens=2)
    proc = RowLogits(params, stop_ids={4})
    raw = _logits([1.0, 2.0, 3.0, 4.0, 5.0])
    out = proc.process(raw, history=[], generated=0)
    assert out[0, 2] == pytest.approx(103.0) and out[0, 0] == pytest.approx(-99.0) and out[0, 4] == -np.inf
    assert proc.process(raw, history=[], generated=2)[0, 4] == pytest.approx(5.0)  # the ban ends at min_tokens
    assert raw[0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # the caller's logits are never modified
    plain = RowLogits(SamplingParams(), stop_ids={4})
    assert plain.process(raw, history=[1], generated=1) is raw  # nothing asked: no copy, no work
    with pytest.raises(InputError, match="logit_bias"):
        RowLogits(SamplingParams(logit_bias={7: 1.0}), ()).process(raw, [], 0)  # id 7 >= vocab 5


def test_log_softmax_and_top_logprobs():
    x = np.array([0.5, 3.0, -1.0, 3.0, 2.0])
    lp = log_softmax(x)
    assert np.exp(lp).sum() == pytest.approx(1.0)
    assert lp[1] == pytest.approx(3.0 - np.log(np.exp(x).sum()))
    assert [t for t, _ in top_logprobs(lp, 3)] == [1, 3, 4]  # ties: lower id first
    entry = token_logprob(x.astype(np.float32), 0, 2)
    assert entry.token == 0 and entry.logprob == pytest.approx(lp[0], abs=1e-6) and len(entry.top) == 2


@pytest.mark.parametrize("field, value, option", [
    ("presence_penalty", 2.5, "presence_penalty"), ("frequency_penalty", -3, "frequency_penalty"),
    ("logit_bias", {5: 101}, "logit_bias"), ("logit_bias", {-1: 1}, "logit_bias"),
    ("min_tokens", 200, "min_tokens"), ("logprobs", 21, "logprobs"),
])
def test_out_of_range_settings_name_their_option(field, value, option):
    with pytest.raises(InputError) as exc:
        SamplingParams(max_new_tokens=128, **{field: value})
    assert option in exc.value.options


@pytest.fixture(scope="module")
def gen(tiny_bundle_factory):
    return Bundle.open(tiny_bundle_factory("gqa")[1]).generator()


def test_bias_forces_and_forbids_tokens(gen):
    greedy, _ = gen.generate([PROMPT], SamplingParams(max_new_tokens=6))
    first = greedy[0].token_ids[0]
    forced, _ = gen.generate([PROMPT], SamplingParams(max_new_tokens=6, logit_bias={42: 100}))
    assert forced[0].token_ids == [42] * 6
    banned, _ = gen.generate([PROMPT], SamplingParams(max_new_tokens=6, logit_bias={first: -100}))
    assert first not in banned[0].token_ids and banned[0].token_ids != greedy[0].token_ids


def test_min_tokens_and_ignore_eos(gen):
    eos = gen.default_stop_ids[0]
    push = {eos: 100}  # the stop id becomes every step's argmax
    stopped, _ = gen.generate([PROMPT], SamplingParams(max_new_tokens=8, logit_bias=push))
    assert stopped[0].token_ids == [] and stopped[0].finish_reason == "stop"
    late, _ = gen.generate([PROMPT], SamplingParams(max_new_tokens=8, logit_bias=push, min_tokens=3))
    assert len(late[0].token_ids) == 3 and eos not in late[0].token_ids and late[0].finish_reason == "stop"
    endless, _ = gen.generate([PROMPT], SamplingParams(max_new_tokens=5, logit_bias=push, ignore_eos=True))
    assert endless[0].token_ids == [eos] * 5 and endless[0].finish_reason == "length"


def test_per_row_settings_in_one_batch_equal_single_runs(gen):
    rows = [SamplingParams(max_new_tokens=7, logit_bias={42: 12.0}, presence_penalty=1.0, frequency_penalty=2.0),
            SamplingParams(max_new_tokens=7, logit_bias={42: 12.0}),
            SamplingParams(max_new_tokens=7, temperature=0.9, seed=3, logit_bias={11: 5.0}, logprobs=2)]
    batch, _ = gen.generate([PROMPT] * 3, rows)
    for r, params in enumerate(rows):
        single, _ = gen.generate([PROMPT], params)
        assert batch[r].token_ids == single[0].token_ids
    assert batch[1].token_ids == [42] * 7  # the bias alone repeats the token; the penalties curb it
    assert 1 <= batch[0].token_ids.count(42) < 7
    assert batch[1].logprobs is None  # recorded only when asked
    assert [e.token for e in batch[2].logprobs] == batch[2].token_ids
    assert all(len(e.top) == 2 and e.top[0][1] >= e.top[1][1] for e in batch[2].logprobs)
    # One SamplingParams for all rows (the CLI's shared sampler) takes the same per-row path.
    shared, _ = gen.generate([PROMPT, PROMPT], rows[0])
    assert shared[0].token_ids == shared[1].token_ids == batch[0].token_ids

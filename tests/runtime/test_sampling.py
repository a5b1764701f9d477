"""Sampling: validation, filtering math on hand-made distributions, empirical frequencies, determinism."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from qwen2edge.errors import InferenceError, InputError, cli_spelling, field_spelling
from qwen2edge.runtime.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_rng,
    probabilities,
    sample_next,
)


def logits_of(*probs: float, dtype: type = np.float32) -> np.ndarray:
    """[1, V] logits whose softmax is `probs` (zeros become -inf)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray([probs], dtype=np.float64)).astype(dtype)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"temperature": -0.1}, "--temperature"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"temperature": float("inf")}, "--temperature"),
        ({"top_k": -1}, "--top-k"),
        ({"top_k": 2.5}, "--top-k"),
        ({"top_k": True}, "--top-k"),
        ({"top_p": 0.0}, "--top-p"),
        ({"top_p": 1.5}, "--top-p"),
        ({"top_p": -0.2}, "--top-p"),
        ({"repetition_penalty": 0.0}, "--repetition-penalty"),
        ({"repetition_penalty": -1.0}, "--repetition-penalty"),
        ({"max_new_tokens": 0}, "--max-new-tokens"),
        ({"max_new_tokens": -5}, "--max-new-tokens"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_invalid_params_raise_one_line_input_error(kwargs: dict, flag: str) -> None:
    with pytest.raises(InputError) as info:
        SamplingParams(**kwargs)
    message = info.value.render(cli_spelling)
    assert "\n" not in message
    assert flag in message
    assert repr(next(iter(kwargs.values()))) in message
    # The same error returned to an HTTP client names the request field instead of the flag.
    field = info.value.render(field_spelling({"max_new_tokens": "max_tokens"}))
    assert "--" not in field and info.value.options


def test_http_spelling_names_the_request_field() -> None:
    with pytest.raises(InputError) as info:
        SamplingParams(max_new_tokens=0)
    assert info.value.render(field_spelling({"max_new_tokens": "max_tokens"})).endswith("set 'max_tokens' to 1 or more")


def test_top_p_message_matches_house_style() -> None:
    with pytest.raises(InputError) as info:
        SamplingParams(top_p=1.5)
    assert re.match(r"^top_p must be in \(0, 1\], got 1\.5: set --top-p between 0 and 1$", info.value.render(cli_spelling))


def test_boundary_values_are_accepted() -> None:
    params = SamplingParams(max_new_tokens=1, temperature=0, top_k=0, top_p=1.0, repetition_penalty=1e-3, seed=0)
    assert params.greedy
    assert not SamplingParams(temperature=1e-4).greedy


def test_stop_fields_become_hashable_tuples() -> None:
    params = SamplingParams(stop_token_ids=[7, 9], stop_strings=["END"])  # type: ignore[arg-type]
    assert params.stop_token_ids == (7, 9)
    assert params.stop_strings == ("END",)
    assert hash(params) == hash(SamplingParams(stop_token_ids=(7, 9), stop_strings=("END",)))


# --- probabilities on hand-made distributions --------------------------------------------------


def test_top_p_keeps_smallest_nucleus_and_renormalizes() -> None:
    probs = probabilities(logits_of(0.5, 0.3, 0.15, 0.05), SamplingParams(temperature=1.0, top_p=0.8))
    np.testing.assert_allclose(probs, [[0.625, 0.375, 0.0, 0.0]], atol=1e-6)
    assert probs.dtype == np.float64
    assert probs[0, 2] == 0.0 and probs[0, 3] == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("dist", "top_p", "kept"),
    [
        ((0.5, 0.3, 0.15, 0.05), 0.8, 2),
        ((0.5, 0.3, 0.15, 0.05), 0.95, 3),
        ((0.4, 0.3, 0.2, 0.1), 0.4, 1),
        ((0.7, 0.2, 0.1), 0.9, 2),
        ((0.35, 0.35, 0.2, 0.1), 0.7, 2),
    ],
)
def test_top_p_exactly_on_a_boundary_is_robust_to_rounding(dist: tuple, top_p: float, kept: int, dtype: type) -> None:
    # Each top_p equals the head's exact mass; float noise in softmax lands on either side of it.
    probs = probabilities(logits_of(*dist, dtype=dtype), SamplingParams(temperature=1.0, top_p=top_p))[0]
    head = np.asarray(dist[:kept])
    np.testing.assert_allclose(probs, np.concatenate([head / head.sum(), np.zeros(len(dist) - kept)]), atol=1e-6)


def test_top_p_just_above_a_boundary_takes_one_more_token() -> None:
    probs = probabilities(logits_of(0.5, 0.3, 0.15, 0.05), SamplingParams(temperature=1.0, top_p=0.81))
    np.testing.assert_allclose(probs, [[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]], atol=1e-6)


@pytest.mark.parametrize("top_p", [0.05, 1e-9])
def test_top_p_always_keeps_the_top_token(top_p: float) -> None:
    probs = probabilities(logits_of(0.1, 0.9), SamplingParams(temperature=1.0, top_p=top_p))
    np.testing.assert_array_equal(probs, [[0.0, 1.0]])


def test_top_k_keeps_the_k_largest() -> None:
    probs = probabilities(logits_of(0.1, 0.4, 0.2, 0.3), SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(probs, [[0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7]], atol=1e-6)


def test_top_k_keeps_ties_with_the_kth_score() -> None:
    probs = probabilities(np.array([[1.0, 1.0, 0.0]]), SamplingParams(temperature=1.0, top_k=1))
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0]])


def test_top_k_is_applied_before_top_p() -> None:
    # After top-k=3 the mass is [4/9, 3/9, 2/9]; 4/9+3/9 > 0.75 so two tokens survive.
    # top-p alone would need three ([0.4, 0.3] sums to 0.7 < 0.75).
    logits = logits_of(0.4, 0.3, 0.2, 0.1)
    both = probabilities(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.75))
    np.testing.assert_allclose(both, [[4 / 7, 3 / 7, 0.0, 0.0]], atol=1e-6)
    only_p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.75))
    np.testing.assert_allclose(only_p, [[4 / 9, 3 / 9, 2 / 9, 0.0]], atol=1e-6)


@pytest.mark.parametrize(
    ("temperature", "expected"),
    [
        (1.0, [1 / 3, 2 / 3]),
        (0.5, [1 / 5, 4 / 5]),
        (2.0, [1 / (1 + math.sqrt(2)), math.sqrt(2) / (1 + math.sqrt(2))]),
    ],
)
def test_temperature_scales_logits(temperature: float, expected: list[float]) -> None:
    logits = np.array([[0.0, math.log(2.0)]], dtype=np.float64)
    np.testing.assert_allclose(probabilities(logits, SamplingParams(temperature=temperature)), [expected])


def test_zero_temperature_probabilities_are_one_hot_argmax() -> None:
    logits = np.array([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]], dtype=np.float32)
    np.testing.assert_array_equal(probabilities(logits, SamplingParams()), [[0, 1, 0], [1, 0, 0]])


def test_probabilities_are_computed_per_row() -> None:
    rows = [logits_of(0.5, 0.3, 0.15, 0.05), logits_of(0.05, 0.15, 0.3, 0.5)]
    params = SamplingParams(temperature=0.7, top_k=3, top_p=0.8)
    batched = probabilities(np.concatenate(rows), params)
    for i, row in enumerate(rows):
        np.testing.assert_allclose(batched[i : i + 1], probabilities(row, params))
    np.testing.assert_allclose(batched.sum(axis=-1), 1.0)


def test_bad_logits_are_rejected() -> None:
    with pytest.raises(InputError, match="batch, vocab"):
        probabilities(np.zeros(4), SamplingParams(temperature=1.0))
    with pytest.raises(InferenceError, match="row 1"):
        probabilities(np.array([[0.0, 1.0], [np.nan, 0.0]]), SamplingParams(temperature=1.0))
    with pytest.raises(InferenceError):
        sample_next(np.array([[np.nan, 0.0]], dtype=np.float32), SamplingParams(), make_rng(0))


# --- sampling --------------------------------------------------------------------------------


def test_greedy_is_argmax_per_row() -> None:
    logits = make_rng(3).normal(size=(6, 1000)).astype(np.float32)
    out = sample_next(logits, SamplingParams(), make_rng(None))
    assert out.dtype == np.int64 and out.shape == (6,)
    np.testing.assert_array_equal(out, logits.argmax(axis=-1))


def test_top_k_one_equals_greedy_even_when_sampling() -> None:
    logits = make_rng(4).normal(size=(8, 500)).astype(np.float32)
    rng = make_rng(123)
    for _ in range(20):
        out = sample_next(logits, SamplingParams(temperature=1.5, top_k=1), rng)
        np.testing.assert_array_equal(out, logits.argmax(axis=-1))


def test_same_seed_reproduces_and_other_seed_differs() -> None:
    logits = make_rng(5).normal(size=(4, 2000)).astype(np.float32)
    params = SamplingParams(temperature=1.0, seed=42)

    def run(seed: int) -> list[list[int]]:
        rng = make_rng(seed)
        return [sample_next(logits, params, rng).tolist() for _ in range(30)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_empirical_frequencies_match_filtered_distribution() -> None:
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9)
    row = logits_of(0.3, 0.25, 0.2, 0.1, 0.08, 0.05, 0.02)
    expected = probabilities(row, params)[0]
    assert np.count_nonzero(expected) == 4  # top-k removes 2, top-p then one more

    n = 20000
    draws = sample_next(np.repeat(row, n, axis=0), params, make_rng(2024))
    counts = np.bincount(draws, minlength=row.shape[1])
    assert counts[expected == 0].sum() == 0
    kept = expected > 0
    chi2 = float((((counts[kept] - n * expected[kept]) ** 2) / (n * expected[kept])).sum())
    # 3 degrees of freedom: P(chi2 > 16.27) = 0.001 under a correct sampler.
    assert chi2 < 16.27, (counts, n * expected)


def test_filtered_first_token_is_never_drawn_even_at_u_zero() -> None:
    class EdgeRng:
        def __init__(self, value: float) -> None:
            self.value = value

        def random(self, size: int) -> np.ndarray:
            return np.full(size, self.value)

    logits = np.array([[-1.0, 2.0, 0.0, 2.0]], dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_k=2)
    # random() == 0 is the extreme low draw; the largest double below 1 the extreme high one.
    assert sample_next(logits, params, EdgeRng(0.0)).tolist() == [3]
    assert sample_next(logits, params, EdgeRng(np.nextafter(1.0, 0.0))).tolist() == [1]


# --- repetition penalty ----------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_once() -> None:
    logits = np.array([[2.0, -2.0, 0.5, 1.0], [2.0, -2.0, 0.5, 1.0]], dtype=np.float32)
    before = logits.copy()
    out = apply_repetition_penalty(logits, [[0, 1, 1, 1], [3]], 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 0.5, 1.0], [2.0, -2.0, 0.5, 0.5]])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(logits, before)


def test_repetition_penalty_below_one_boosts_and_accepts_arrays() -> None:
    out = apply_repetition_penalty(np.array([[2.0, -2.0, 1.0]]), np.array([[0, 1]]), 0.5)
    np.testing.assert_allclose(out, [[4.0, -1.0, 1.0]])


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = np.array([[3.0, 2.0, -1.0]], dtype=np.float32)
    assert sample_next(logits, SamplingParams(repetition_penalty=2.0), make_rng(0)).tolist() == [0]
    penalized = sample_next(logits, SamplingParams(repetition_penalty=2.0), make_rng(0), prev_ids=[[0]])
    assert penalized.tolist() == [1]


def test_repetition_penalty_rejects_bad_prev_ids() -> None:
    logits = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(InputError, match="one id list per batch row"):
        apply_repetition_penalty(logits, [[1]], 1.3)
    with pytest.raises(InputError, match="outside"):
        apply_repetition_penalty(logits, [[1], [4]], 1.3)
    with pytest.raises(InputError, match="outside"):
        apply_repetition_penalty(logits, [[-1], [0]], 1.3)

"""Compare metrics on hand-computed distributions, thresholds and the JSONL prompt format."""

import json
import math

import numpy as np
import pytest

from qwen2edge.errors import InputError
from qwen2edge.validation import metrics as M
from qwen2edge.validation.prompts import BUILTIN, load_prompts
from qwen2edge.validation.thresholds import CRITERIA, TOLERANCES, parse_overrides, thresholds_for, tolerance_row


def test_kl_divergence_by_hand():
    ref, ours = np.log([[0.5, 0.5]]), np.log([[0.25, 0.75]])
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3)
    assert M.kl_divergence(ref, ours)[0] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    # KL(q || p) differs: 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5)
    assert M.kl_divergence(ours, ref)[0] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-12)
    # Logits are shift-invariant: same distribution, zero divergence.
    assert M.kl_divergence(np.array([[1.0, 2.0, 3.0]]), np.array([[11.0, 12.0, 13.0]]))[0] == pytest.approx(0, abs=1e-15)


def test_perplexity_by_hand():
    assert M.perplexity(np.zeros((5, 8)), [1, 2, 3, 4, 5]) == pytest.approx(8.0)  # uniform over 8 tokens
    # Row 0 gives the next token p = 1/2, row 1 gives p = 1/4: ppl = exp((ln 2 + ln 4) / 2) = sqrt(8).
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]))
    assert M.perplexity(logits, [2, 0, 1]) == pytest.approx(math.sqrt(8))
    with pytest.raises(InputError):
        M.perplexity(np.zeros((1, 4)), [1])


def test_polygraphy_errors_and_relative_error_by_hand():
    max_abs, mean_abs, cos = M.polygraphy_errors(np.array([1.0, 0.0], np.float32), np.array([1.0, 1.0], np.float32))
    assert (max_abs, mean_abs) == (1.0, 0.5)
    assert cos == pytest.approx(1 / math.sqrt(2))
    # Relative to the row's largest |ref| logit (not elementwise: ref 0 would divide by zero).
    assert M.relative_error(np.array([[2.0, -4.0, 0.0]]), np.array([[2.5, -4.0, 0.0]]))[0] == pytest.approx(0.125)


def test_block_errors_equal_polygraphys():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((5, 1000)).astype(np.float32)
    ours = ref + rng.standard_normal((5, 1000)).astype(np.float32) * 0.01
    np.testing.assert_allclose(M.block_errors(ref, ours), M.polygraphy_errors(ref, ours), rtol=1e-5)


def test_top1_top5_and_greedy_match_by_hand():
    ref = np.array([5.0, 4, 3, 2, 1, 0])
    ours = np.array([0.0, 4, 3, 2, 1, 5])
    assert M.top1_agreement(ref, ours) == 0.0 and M.top1_agreement(ref, ref) == 1.0
    assert M.topk_overlap(ref, ours, 5)[0] == pytest.approx(0.8)  # {0,1,2,3,4} vs {5,1,2,3,4}
    assert M.topk_overlap(np.stack([ref, ref]), np.stack([ours, ref]), 5).tolist() == [0.8, 1.0]
    assert M.greedy_match_length([1, 2, 3], [1, 2, 4]) == 2
    assert M.greedy_match_length([1, 2, 3], [1, 2, 3]) == 3
    assert M.greedy_match_length([1, 2, 3], []) == 0


def test_step_metrics_of_a_shifted_row():
    ref = np.array([2.0, 1.0, 0.0, -1.0, -2.0, -3.0])
    m = M.step_metrics(3, ref, ref + np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.3]))
    assert m.step == 3 and m.max_abs == pytest.approx(0.3, rel=1e-6) and m.mean_abs == pytest.approx(0.05, rel=1e-6)
    assert m.top1 == 1.0 and m.top5 == 1.0 and 0 < m.kl < 1e-3 and m.cosine < 1.0
    assert m.rel == pytest.approx(0.3 / 3)


def test_error_histogram_bins():
    h = M.ErrorHistogram()
    h.add(np.zeros(5), np.array([0.0, 1.5e-3, 5e-3, 2e-9, 1e3]))
    d = h.to_dict()
    assert (d["zeros"], d["below_range"], d["above_range"]) == (1, 1, 1)
    assert sum(d["counts"]) == 2
    i = int(np.searchsorted(M.HIST_EDGES, 1.5e-3, side="right")) - 1
    assert d["counts"][i] == 1 and d["edges"][i] <= 1.5e-3 < d["edges"][i + 1]


def test_thresholds_defaults_and_overrides():
    assert TOLERANCES["fp32"]["max_abs"] < TOLERANCES["fp16"]["max_abs"] < TOLERANCES["bf16"]["max_abs"]
    assert all(set(row) == set(CRITERIA) for row in TOLERANCES.values())  # every row bounds every criterion
    assert thresholds_for("fp16", parse_overrides(["max_abs=0.25", "min_top1 = 0.5"]))["max_abs"] == 0.25
    for bad in ("max_abs", "nope=1", "max_abs=abc"):
        with pytest.raises(InputError) as err:
            parse_overrides([bad])
        assert err.value.options[0] == "threshold"  # the CLI spells it --threshold
    with pytest.raises(InputError, match="no tolerances for 'int3'"):
        thresholds_for("int3")


def test_each_criterion_fails_in_its_stated_direction():
    """The direction is data on the criterion, not read from the key's spelling."""
    assert CRITERIA["max_mean_kl"].passes(1e-6, 1e-5) and not CRITERIA["max_mean_kl"].passes(1e-4, 1e-5)
    assert CRITERIA["min_top5"].passes(0.99, 0.98) and not CRITERIA["min_top5"].passes(0.9, 0.98)
    assert CRITERIA["min_top5"].measure == "top5" and CRITERIA["max_mean_kl"].measure == "mean_kl"
    assert not CRITERIA["max_abs"].passes(float("nan"), 1.0) and not CRITERIA["min_cosine"].passes(float("nan"), 0.0)


def test_tolerance_row_per_runner(tiny_bundle_factory):
    """Quantized bundles: the graph's own arithmetic is held to the dtype row, the fast kernels to the scheme's."""
    import dataclasses

    from qwen2edge.bundle_manifest import QuantizationRecord
    from qwen2edge.runtime.bundle import Bundle

    manifest = Bundle.open(tiny_bundle_factory("gqa")[1]).manifest
    q = dataclasses.replace(manifest, quantization=QuantizationRecord("int4", 32, True))
    assert tolerance_row(q, "ort") == tolerance_row(q, "trt") == "int4" and tolerance_row(q, "ort-graph") == "fp32"
    assert tolerance_row(dataclasses.replace(manifest, dtype="fp16"), "ort") == "fp16"


def test_builtin_prompts_cover_the_four_categories():
    cats = {(p.category, p.kind) for p in BUILTIN}
    for c in ("english", "chinese", "code", "math"):
        assert (c, "generate") in cats and (c, "perplexity") in cats


def test_jsonl_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('# comment\n{"text": "Hi", "id": "a"}\n\n'
                 + json.dumps({"text": "Long text here", "kind": "perplexity", "category": "english"}) + "\n",
                 encoding="utf-8")
    ps = load_prompts(f)
    assert [(p.id, p.kind, p.category, p.chat) for p in ps] == [("a", "generate", "user", True),
                                                                ("line-4", "perplexity", "english", True)]
    for text, needle in [('{"text": "a"}\n{bad', ":2 is not valid JSON"), ('{"txt": "a"}', 'no non-empty "text"'),
                         ('{"text": "a", "kind": "x"}', "has kind"), ('{"text": "a", "foo": 1}', "unknown keys"),
                         ('{"text": "a", "id": "x"}\n{"text": "b", "id": "x"}', "repeats prompt ids")]:
        f.write_text(text, encoding="utf-8")
        with pytest.raises(InputError, match=needle):
            load_prompts(f)

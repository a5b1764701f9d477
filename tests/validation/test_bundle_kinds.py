"""validate and compare on every kind of bundle the exporter makes (tiny models): PASS on a faithful
export, FAIL on the same kind exported from a checkpoint with one MLP weight scaled by 1.05."""

import pytest

from qwen2edge.validation.compare import compare
from qwen2edge.validation.prompts import BUILTIN
from qwen2edge.validation.validate import table, validate

from .kinds import KINDS, LAYOUT_KINDS, LONG_PROMPT as LONG

FEW = tuple(p for p in BUILTIN if p.id in ("en-capital", "zh-intro", "ppl-en"))
QUANTIZED = ("int8", "int4")


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS) + list(LAYOUT_KINDS))
def test_faithful_bundle_passes_validate_and_compare(kind, kind_bundle):
    model, bundle = kind_bundle(kind)
    v = validate(model, bundle, steps=4, long_prompt_tokens=LONG.get(kind, 0))
    assert v.passed, table(v)
    c = compare(model, bundle, prompts=FEW, steps=4, long_prompt_tokens=LONG.get(kind, 0))
    assert c.passed, c.failures
    for result in (v, c):
        # The reference is named, and is the float64 implementation exactly where transformers has no DCA.
        assert result.reference["kind"] == ("float64" if kind.startswith("dca") else "transformers")
        assert result.reference["name"] in table(v)
        if kind in LONG:
            assert not result.notes, result.notes  # the long prompt reached the long-context positions
    # Quantized: the graph's own arithmetic matches the quantized reference to float32 rounding, while
    # ONNX Runtime's int8-activation kernel is judged by the scheme's row.
    expected = ["ort-graph", "ort"] if kind in QUANTIZED else ["ort"]
    assert [b.backend for b in c.backends] == expected
    if kind in QUANTIZED:
        assert c.backend("ort-graph").summary["max_abs"] < 1e-4 and c.backend("ort").tolerance_row == kind
        assert "quantized as the bundle stores them" in c.reference["weights"] and c.storage_cost
    # Per-layer drift works for every kind: the debug re-export keeps the flags (YaRN, DCA) and the
    # quantization, or the hidden states would drift by far more than 1e-3.
    lay = c.layers
    assert lay is not None and lay.check.passed and len(lay.rows) == 3 and lay.check.measured < 1e-3 * (
        1 if kind != "fp16" else 50)
    if kind == "debug":
        assert lay.source == "bundle (debug export)"
    else:
        opts = KINDS.get(kind, ("", {}))[1]
        for flag in [*opts.get("quantize", ())[:1], *opts.get("long_context", {})]:
            assert str(flag) in lay.source, lay.source
    assert c.bundle["external_data"] == (kind == "external") and c.bundle["debug_hidden_states"] == (kind == "debug")


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_one_mlp_weight_scaled_by_1_05_fails_validate_and_compare(kind, kind_bundle):
    model, bundle = kind_bundle(kind, broken=True)
    v = validate(model, bundle, steps=4)
    assert not v.passed, table(v)
    c = compare(model, bundle, prompts=FEW, steps=4, layers=False)
    assert not c.passed
    judge = "ort-graph" if kind in QUANTIZED else "ort"  # the runner held to the export's own precision
    assert not c.backend(judge).passed and not v.backend(judge).passed

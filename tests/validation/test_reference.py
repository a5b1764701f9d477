"""The reference's own parts: the quantized weights it rebuilds, and the float64 implementation's independence."""

import ast
import inspect

import numpy as np
import pytest
import torch

from qwen2edge.bundle_manifest import QuantizationRecord
from qwen2edge.errors import BundleError
from qwen2edge.exporter.export import ExportOptions, export_bundle
from qwen2edge.exporter.quantize import QuantizeOptions, quantize_blocks
from qwen2edge.validation import naive
from qwen2edge.validation.storage import WeightQuantization, dequantized
from qwen2edge.validation.validate import PROMPTS, table, validate


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4sym"])
def test_rebuilt_grid_equals_the_exporters_bit_for_bit(scheme):
    """storage.py is written from the recipe's definition, not from the exporter: the two must agree exactly,
    on skewed, all-positive, all-negative and all-zero blocks too."""
    w = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32) * 0.05  # [N, K] as in a checkpoint
    w[0, :32] += 0.3
    w[1, 32:64] = np.abs(w[1, 32:64])
    w[2, 64:96] = -np.abs(w[2, 64:96])
    w[3, 96:128] = 0.0
    q, scale, zp = quantize_blocks(w.T.copy(), scheme[:4], 32, symmetric=scheme == "int4sym")  # exporter: [K, N]
    zero = 0 if zp is None else np.repeat(zp.astype(np.float32), 32, axis=0)
    want = ((q.astype(np.float32) - zero) * np.repeat(scale, 32, axis=0)).T
    np.testing.assert_array_equal(dequantized(torch.from_numpy(w), scheme, 32).numpy(), want)


def test_an_unknown_quantization_recipe_is_refused():
    """A recipe the reference cannot rebuild (say a changed int4 grid) is refused, not silently misjudged."""
    record = QuantizationRecord.from_dict({"scheme": "int4", "block_size": 32, "embeddings": True,
                                           "format": "DequantizeLinear(block_size)+MatMul", "weights": "int4 symmetric"})
    with pytest.raises(BundleError, match="not one this qwen2edge can rebuild"):
        WeightQuantization.from_record(record)
    assert WeightQuantization.from_record(None) is None
    known = QuantizationRecord.from_dict({**record.to_dict(), "weights": "uint4 asymmetric (zero point per block)"})
    assert WeightQuantization.from_record(known).describe().startswith("uint4 asymmetric")
    searched = QuantizeOptions("int4", 32, True, int4_search=True).to_dict()  # library-only: not rebuilt
    with pytest.raises(BundleError, match="not one this qwen2edge can rebuild"):
        WeightQuantization.from_record(QuantizationRecord.from_dict(searched))
    for opts in (QuantizeOptions("int4", 32, True), QuantizeOptions("int4", 32, True, int4_symmetric=True)):
        assert WeightQuantization.from_record(QuantizationRecord.from_dict(opts.to_dict())).describe()


@pytest.mark.slow
@pytest.mark.parametrize("quant", [QuantizeOptions("int8", 32, True), QuantizeOptions("int4", 64, False),
                                   QuantizeOptions("int4", 32, True),  # the default: lm_head int8
                                   QuantizeOptions("int4", 32, True, int4_symmetric=True, int4_lm_head_int8=False)])
def test_tied_and_partly_float_quantized_bundles_are_rebuilt_exactly(quant, tiny_model_factory, tmp_path):
    """Tied embeddings quantized twice (int8 table, scheme lm_head) and a recipe that leaves matrices float
    (block 64: the MLP's 96-wide down_proj, and the lm_head without embeddings): the graph's own arithmetic
    still equals the reference, and the rule's tensor count matches the exporter's."""
    model = tiny_model_factory("mqa_tied")
    out = tmp_path / f"{quant.scheme}-{quant.block_size}-{quant.int4_symmetric}"
    export_bundle(model, out, ExportOptions(max_seq_len=64, trt_check=None, quantize=quant))
    result = validate(model, out, steps=2, prompts=PROMPTS[:1] + PROMPTS[-1:])
    assert result.passed, table(result)
    assert result.backend("ort-graph").summary["max_abs"] < 1e-4


def test_float64_reference_shares_no_code_with_what_it_checks():
    """naive.py imports nothing from the graph, the position code or the config parser: only numpy."""
    tree = ast.parse(inspect.getsource(naive))
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "math", "typing", "numpy"}, imported

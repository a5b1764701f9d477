"""Weight-only int8/int4 export: the quantizer's arithmetic, the graph it writes, ONNX Runtime's
fusion of that graph into MatMulNBits, and the bundle's outputs against the fp32 bundle."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qwen2edge.exporter.export import ExportOptions, export_bundle
from qwen2edge.exporter.quantize import QuantizeOptions, pack_int4, quantize_blocks
from qwen2edge.bundle_manifest import QuantizationRecord
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.validation.engine import teacher_forced

from ..test_cli import assert_one_line_error, run_cli


def _deq(q, scale, zp, block):
    steps = np.repeat(scale, block, axis=0)
    zero = 0 if zp is None else np.repeat(zp, block, axis=0).astype(np.float32)
    return (q.astype(np.float32) - zero) * steps, steps


def _weights():
    w = np.random.default_rng(0).standard_normal((256, 48)).astype(np.float32) * 0.05
    w[:32, 0] += 0.3  # one skewed block
    return w


@pytest.mark.parametrize("scheme,symmetric", [("int8", True), ("int4", True), ("int4", False)])
@pytest.mark.parametrize("block", [32, 128])
def test_blockwise_roundtrip_error_is_bounded_by_the_grid(scheme, symmetric, block):
    w = _weights()
    q, scale, zp = quantize_blocks(w, scheme, block, symmetric=symmetric)
    assert scale.shape == (256 // block, 48)
    deq, steps = _deq(q, scale, zp, block)
    err = np.abs(deq - w)
    if scheme == "int8":
        assert q.dtype == np.int8 and np.abs(q).max() == 127  # each block's largest weight uses the full range
        assert np.all(err <= steps / 2 + 1e-7)
    elif symmetric:
        # the largest magnitude lands exactly on -8 or +7; scales stay positive (TensorRT)
        assert zp is None and q.min() >= -8 and q.max() <= 7 and np.all(scale > 0)
        # half a step, except a positive weight in a block led by a negative one (-8 side) may clip at +7
        assert np.all(err <= steps + 1e-7) and np.mean(err <= steps / 2 + 1e-7) > 0.95
        big = np.abs(w.reshape(256 // block, block, 48)).argmax(axis=1)
        exact = np.take_along_axis(err.reshape(256 // block, block, 48), big[:, None], axis=1)
        assert np.all(exact < 1e-6)
    else:
        assert q.min() >= 0 and q.max() <= 15 and zp.max() <= 15
        assert np.all(err <= steps / 2 + 1e-7)


@pytest.mark.parametrize("symmetric", [True, False])
def test_scale_search_never_loses_to_the_plain_scale(symmetric):
    """The search's candidates include the plain scale, refit by least squares: per block, its
    weighted error (rms(block) + |w|, as llama.cpp's k-quants weigh) can only be lower or equal."""
    w = _weights()
    block = 32

    def weighted_err(search):
        q, scale, zp = quantize_blocks(w, "int4", block, symmetric=symmetric, search=search)
        deq, _ = _deq(q, scale, zp, block)
        wb = w.reshape(-1, block, 48)
        weight = np.sqrt((wb**2).mean(axis=1, keepdims=True)) + np.abs(wb)
        return ((deq.reshape(wb.shape) - wb) ** 2 * weight).sum(axis=1)

    plain, searched = weighted_err(False), weighted_err(True)
    assert np.all(searched <= plain * (1 + 1e-5) + 1e-12)
    assert searched.sum() < plain.sum() * 0.98  # and it finds better scales overall


@pytest.mark.parametrize("scheme,symmetric,search", [("int8", True, False), ("int4", True, True), ("int4", False, False)])
def test_fused_matrix_quantizes_exactly_like_its_parts(scheme, symmetric, search):
    """q/k/v (and gate/up) are one [K, N_q + N_k + N_v] weight now: blocks run along K of each column,
    so the fused matrix gets bit for bit the values its parts got when they were separate."""
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal((64, n)).astype(np.float32) * 0.1 for n in (16, 8, 8)]
    fused = quantize_blocks(np.concatenate(parts, axis=1), scheme, 32, symmetric=symmetric, search=search)
    alone = [quantize_blocks(p, scheme, 32, symmetric=symmetric, search=search) for p in parts]
    for i in range(2):
        np.testing.assert_array_equal(fused[i], np.concatenate([a[i] for a in alone], axis=1))
    assert (fused[2] is None) == all(a[2] is None for a in alone)


def test_4bit_packing_matches_onnx():
    vals = np.random.default_rng(1).integers(0, 16, (6, 5)).astype(np.uint8)
    t = onnx.helper.make_tensor("t", onnx.TensorProto.UINT4, vals.shape, pack_int4(vals), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(t), vals)
    signed = np.random.default_rng(2).integers(-8, 8, (5, 5)).astype(np.int8)  # odd count: padded
    t = onnx.helper.make_tensor("t", onnx.TensorProto.INT4, signed.shape, pack_int4(signed), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(t), signed)


@pytest.fixture(scope="module")
def quantized(tiny_model_factory, tiny_bundle_factory, tmp_path_factory):
    """fp32, int8 (embeddings included) and int4 (embeddings float, block 64) bundles of one model."""
    model_dir, fp32 = tiny_bundle_factory("mqa_tied")
    root = tmp_path_factory.mktemp("quant")
    out = {"fp32": fp32}
    for name, q in {"int8": QuantizeOptions("int8", 32, True), "int4": QuantizeOptions("int4", 64, False)}.items():
        out[name] = root / name
        export_bundle(model_dir, out[name], ExportOptions(max_seq_len=96, quantize=q))
    return model_dir, out


def _initializer_dims(model):
    return {t.name: (t.data_type, tuple(t.dims)) for t in model.graph.initializer}


@pytest.mark.slow
def test_quantized_graph_is_portable_blockwise_dequantize(quantized):
    _, b = quantized
    cfg = Bundle.open(b["fp32"]).config
    vocab = cfg.vocab_size
    for name, embeddings in (("int8", True), ("int4", False)):
        manifest = json.loads((b[name] / "manifest.json").read_text())
        assert manifest["opset"] == 21 and manifest["quantization"]["scheme"] == name
        assert manifest["quantization"]["embeddings"] is embeddings
        model = onnx.load(str(b[name] / "model.onnx"))
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no runtime-specific ops
        dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert dqs and all({a.name: a.i for a in n.attribute}["block_size"] == (32 if name == "int8" else 64) for n in dqs)
        inits = _initializer_dims(model)
        float_matmul_weights = [inits[n.input[1]][1] for n in model.graph.node
                                if n.op_type == "MatMul" and n.input[1] in inits and inits[n.input[1]][0] == 1]
        # int8/32: everything quantized. int4/64: the lm_head (embeddings excluded) and down_proj,
        # whose reduction axis (intermediate 96) is no multiple of 64, stay float and are recorded.
        skipped = manifest["quantization"]["skipped_tensors"]
        expected = [] if embeddings else [(96, cfg.hidden_size)] * 2 + [(cfg.hidden_size, vocab)]
        assert sorted(float_matmul_weights) == sorted(expected)
        assert len(skipped) == (0 if embeddings else 2)
        table_is_float = any(dims == (vocab, cfg.hidden_size) and dt == 1 for dt, dims in inits.values())
        assert table_is_float is (not embeddings)


@pytest.mark.slow
def test_onnx_runtime_fuses_the_portable_graph_into_matmulnbits(quantized, tmp_path):
    _, b = quantized
    bundle = Bundle.open(b["int4"])
    backend = bundle.backend("ort", optimized_model_path=tmp_path / "opt.onnx")
    assert backend is not None
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph.node]
    # per layer: q/k/v fused, o_proj, gate/up fused (down_proj and the lm_head stay float here)
    assert ops.count("MatMulNBits") == 2 * 3
    assert "DequantizeLinear" not in ops


@pytest.mark.slow
def test_quantized_logits_track_fp32(quantized):
    _, b = quantized
    prompt = [15, 2000, 77, 9000, 31, 123, 456, 789]
    logits = {}
    for name in ("fp32", "int8", "int4"):
        logits[name] = teacher_forced(Bundle.open(b[name]).generator(), prompt, [5, 6, 7, 8])
    ref = logits["fp32"]
    for name, (max_rel, min_corr) in {"int8": (0.05, 0.999), "int4": (0.5, 0.95)}.items():
        diff = np.abs(logits[name] - ref).max() / np.abs(ref).max()
        corr = np.corrcoef(logits[name].ravel(), ref.ravel())[0, 1]
        assert diff < max_rel and corr > min_corr, (name, diff, corr)
    assert (logits["int8"].argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_quantized_bundles_use_their_scheme_tolerance(tiny_bundle_factory):
    manifest = Bundle.open(tiny_bundle_factory("gqa")[1]).manifest
    int4 = dataclasses.replace(manifest, quantization=QuantizationRecord("int4", 64, False))
    assert int4.tolerance_key == "int4"
    assert dataclasses.replace(manifest, dtype="fp16", quantization=None).tolerance_key == "fp16"


def test_cli_rejects_bad_quantize_options(tiny_model_factory, tmp_path):
    model_dir = tiny_model_factory("gqa")
    proc = run_cli("export", str(model_dir), "-o", str(tmp_path / "o"), "--quantize", "int4", "--block-size", "48")
    assert proc.returncode == 2 and "48" in proc.stderr
    proc = run_cli("export", str(model_dir), "-o", str(tmp_path / "o"), "--quantize", "int8", "--dtype", "fp16")
    assert_one_line_error(proc, 2, "--quantize needs --dtype fp32")
    assert not (tmp_path / "o").exists()


def _weight_types(bundle_dir: Path) -> dict[str, set[int]]:
    """Element types of the DequantizeLinear inputs: 'q' (the weights) and 'zp', split by lm_head or not."""
    model = onnx.load(str(bundle_dir / "model.onnx"))
    types = {t.name: t.data_type for t in model.graph.initializer}
    out: dict[str, set[int]] = {"layers": set(), "lm_head": set(), "zp": set()}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in types and "embed" not in n.input[0]:
            out["lm_head" if "lm_head" in n.name else "layers"].add(types[n.input[0]])
            if len(n.input) > 2:
                out["zp"].add(types[n.input[2]])
    return out


@pytest.mark.slow
def test_cli_int4_choices_reach_the_graph_and_the_manifest(tiny_model_factory, tmp_path):
    """`export --quantize int4`: by default the measured choice (uint4 + zero points, lm_head int8);
    --int4-weights symmetric --int4-lm-head int4 gives int4 without zero points everywhere."""
    from onnx import TensorProto

    model_dir = tiny_model_factory("gqa")
    runs = {"default": [], "sym": ["--int4-weights", "symmetric", "--int4-lm-head", "int4"]}
    for name, flags in runs.items():
        proc = run_cli("export", str(model_dir), "-o", str(tmp_path / name), "--quantize", "int4", "--max-seq-len", "64",
                       "--trt-check", "none", *flags)
        assert proc.returncode == 0, proc.stderr
    default, sym = (Bundle.open(tmp_path / n).manifest.quantization for n in runs)
    assert default.details["int4"] == {"symmetric": False, "scale_search": False, "lm_head_int8": True}
    assert default.details["lm_head"] == "int8"
    assert sym.details["int4"] == {"symmetric": True, "scale_search": False, "lm_head_int8": False}
    assert sym.details["lm_head"] == "int4"
    assert _weight_types(tmp_path / "default") == {"layers": {TensorProto.UINT4}, "lm_head": {TensorProto.INT8},
                                                   "zp": {TensorProto.UINT4}}
    assert _weight_types(tmp_path / "sym") == {"layers": {TensorProto.INT4}, "lm_head": {TensorProto.INT4}, "zp": set()}
    # ONNX Runtime fuses the symmetric int4 graph into MatMulNBits too (every weight MatMul, lm_head included)
    Bundle.open(tmp_path / "sym").backend("ort", optimized_model_path=tmp_path / "sym-opt.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "sym-opt.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 2 * 4 + 1 and "DequantizeLinear" not in ops


def test_cli_int4_flags_need_int4_and_document_the_defaults(tiny_model_factory, tmp_path):
    from qwen2edge.exporter.quantize import INT4_LM_HEAD_INT8, INT4_SYMMETRIC

    model_dir = tiny_model_factory("gqa")
    out = str(tmp_path / "o")
    proc = run_cli("export", str(model_dir), "-o", out, "--quantize", "int8", "--int4-weights", "symmetric")
    assert_one_line_error(proc, 2, "--int4-weights applies to --quantize int4 only")
    proc = run_cli("export", str(model_dir), "-o", out, "--int4-lm-head", "int4")
    assert_one_line_error(proc, 2, "--int4-lm-head applies to --quantize int4 only")
    proc = run_cli("export", str(model_dir), "-o", out, "--quantize", "int4", "--int4-lm-head", "int8",
                   "--no-quantize-embeddings")
    assert_one_line_error(proc, 2, "--int4-lm-head needs --quantize-embeddings")
    assert not (tmp_path / "o").exists()
    help_text = " ".join(run_cli("export", "--help").stdout.split())
    assert f"[default: {'symmetric' if INT4_SYMMETRIC else 'asymmetric'}]" in help_text
    assert f"[default: {'int8' if INT4_LM_HEAD_INT8 else 'int4'}]" in help_text


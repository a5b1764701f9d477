"""CPU-side behaviour of the TensorRT commands: one-line refusals, and the memory planner's arithmetic."""

import importlib.util
import json

import pytest

from qwen2edge.errors import BuildError, InferenceError, InputError
from qwen2edge.memory_plan import GIB, MIB, plan_memory
from qwen2edge.runtime.bundle import Bundle

from ..test_cli import assert_one_line_error, run_cli

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_build_engine_without_tensorrt_is_one_line(tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    proc = run_cli("build-engine", str(bundle), block_torch=True)
    assert_one_line_error(proc, BuildError.exit_code, "TensorRT is not installed")
    assert not (bundle / "engine").exists()


@pytest.mark.parametrize("args, needle", [
    (["--max-input-len", "1000"], "--max-input-len 1000 must be within 1..96"),
    (["--opt-level", "7"], "--opt-level 7 is outside 0..5"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
])
def test_build_engine_bad_options_fail_before_tensorrt(args, needle, tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    proc = run_cli("build-engine", str(bundle), *args, block_torch=True)
    assert_one_line_error(proc, InputError.exit_code, needle)


def test_generate_trt_without_engine_says_build_first(tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    proc = run_cli("generate", str(bundle), "--backend", "trt", "--prompt", "hi", block_torch=True)
    assert_one_line_error(proc, InferenceError.exit_code, "run `qwen2edge build-engine")


def test_memory_plan_arithmetic(tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    b = Bundle.open(bundle)
    cfg, spec = b.config, b.spec
    plan = plan_memory(bundle, max_batch=3, max_input_len=32, max_logits=4, workspace_mib=100)
    rows = {name: size for name, size, _ in plan.rows}
    kv = 2 * cfg.num_hidden_layers * 3 * cfg.num_key_value_heads * spec.max_seq_len * cfg.head_dim * 4
    assert rows["KV cache"] == kv
    assert rows["builder workspace"] == 100 * MIB
    assert rows["logits buffers"] == 2 * 3 * 4 * cfg.vocab_size * 4
    assert rows["weights (engine ~ ONNX)"] == (bundle / "model.onnx").stat().st_size
    assert plan.run_total == pytest.approx(sum(v for k, v in rows.items() if k != "builder workspace"))
    # more batch, more cache: monotone
    assert plan_memory(bundle, max_batch=6).rows[1][1] == 2 * plan_memory(bundle, max_batch=3).rows[1][1]
    table = plan.table()
    assert "Orin Nano 8GB" in table and "KV cache" in table


def test_memory_plan_refuses_a_module_that_is_too_small(tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    plan = plan_memory(bundle, workspace_mib=5 * 1024)  # 5 GiB workspace cannot build on a 4 GB module
    line = next(l for l in plan.table().splitlines() if l.startswith("Orin Nano 4GB"))
    assert line.split()[-1] in ("swap", "NO") and plan.build_peak > 5 * GIB
    proc = run_cli("plan-memory", str(bundle), "--json", block_torch=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["run_total_bytes"] > 0

"""`validate` (the quick preset of the accuracy engine): the CLI's output, exit codes and one-line errors,
a checkpoint that does not match the bundle, and the default model."""

import json
import shutil

import pytest

from qwen2edge.config import load_hf_config
from qwen2edge.errors import InputError, ValidationError
from qwen2edge.exporter.export import ExportOptions, export_bundle
from qwen2edge.validation.results import SCHEMA, SCHEMA_VERSION, require_pass
from qwen2edge.validation.validate import PROMPTS, table, validate

from ..test_cli import assert_one_line_error, run_cli


def test_fp32_bundle_passes_with_tight_errors(tiny_bundle_factory):
    model, bundle = tiny_bundle_factory("gqa")
    result = validate(model, bundle, steps=8)
    assert result.passed, table(result)
    (b,) = result.backends
    assert b.summary["max_abs"] < 1e-4 and b.summary["min_top1"] == 1.0
    assert all(p["greedy_match"] == p["greedy_steps"] == 8 for p in b.prompts)
    assert [p["id"] for p in b.prompts] == [p.id for p in PROMPTS if p.kind == "generate"]
    assert [q["id"] for q in b.perplexity] == ["ppl-en"] and b.perplexity[0]["delta_rel"] < 1e-4
    assert result.layers is None  # the quick preset skips the per-layer drift
    # Every criterion of the fp32 row was checked, in its own direction, and passed.
    assert {c.key for c in b.checks} == set(b.thresholds) - {"max_layer_rel"} and all(c.passed for c in b.checks)
    assert {c.key: c.passes_when for c in b.checks}["min_top5"] == ">="


def test_cli_validate_json_and_exit_code(tiny_bundle_factory):
    model, bundle = tiny_bundle_factory("mqa_tied")
    proc = run_cli("validate", str(model), str(bundle), "--steps", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["schema"], data["schema_version"], data["preset"]) == (SCHEMA, SCHEMA_VERSION, "validate")
    assert data["passed"] and data["verdict"] == "PASS" and data["reference"]["kind"] == "transformers"
    # An impossible bound fails with the validation exit code and one line naming the check.
    proc = run_cli("validate", str(model), str(bundle), "--steps", "2", "--threshold", "max_abs=1e-12")
    assert_one_line_error(proc, ValidationError.exit_code, "validate failed (ort: max_abs")
    assert "validate: FAIL" in proc.stdout


def test_another_checkpoint_fails_in_one_line_before_any_slow_work(tiny_bundle_factory, tiny_model_factory):
    _, bundle = tiny_bundle_factory("mqa_tied")
    other = tiny_model_factory("gqa")
    for command in ("validate", "compare"):
        proc = run_cli(command, str(other), str(bundle), "--steps", "2")
        assert_one_line_error(proc, InputError.exit_code, "is not the checkpoint")
        err = proc.stderr.strip().splitlines()[-1]
        assert "num_key_value_heads 2 here vs 1 in the bundle" in err and "tie_word_embeddings" in err
        assert "pass the model directory given to `qwen2edge export`" in err
        assert "loading the reference" not in proc.stderr  # nothing slow ran


def test_mismatched_tensor_shape_and_layer_count_are_named(tiny_bundle_factory, tiny_model_factory, tmp_path):
    from safetensors.numpy import load_file, save_file

    model, bundle = tiny_bundle_factory("gqa")
    cut = tmp_path / "cut"
    shutil.copytree(model, cut)
    w = load_file(str(cut / "model.safetensors"))
    w["model.layers.1.mlp.up_proj.weight"] = w["model.layers.1.mlp.up_proj.weight"][:95]
    save_file(w, str(cut / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"model.layers.1.mlp.up_proj.weight is \[95, 64\] here vs \[96, 64\]"):
        validate(cut, bundle)
    deeper = tiny_model_factory("deep4", num_layers=4)
    with pytest.raises(InputError, match="num_hidden_layers 4 here vs 2 in the bundle"):
        validate(deeper, bundle)


def test_a_bundle_exported_from_an_edited_config_is_refused(tiny_model_factory, tmp_path):
    """The bundle claims rope_theta 20000 (not a recorded export flag): not this checkpoint's model."""
    model = tiny_model_factory("gqa")
    cfg, _ = load_hf_config(model)
    other = tmp_path / "theta"
    export_bundle(model, other, ExportOptions(max_seq_len=64, trt_check=None),
                  cfg_override=cfg.replace(rope_theta=cfg.rope_theta * 2))
    with pytest.raises(InputError, match="rope_theta 10000.0 here vs 20000.0 in the bundle"):
        validate(model, other, steps=2)


def test_require_pass_is_the_one_exit(tiny_bundle_factory):
    model, bundle = tiny_bundle_factory("gqa")
    result = validate(model, bundle, steps=2, overrides={"min_cosine": 1.5})
    assert not result.passed and result.failures == ["ort: min_cosine 1, must be >= 1.5"]
    with pytest.raises(ValidationError, match=r"validate failed \(ort: min_cosine 1, must be >= 1.5\)"):
        require_pass(result)


@pytest.mark.slow
def test_default_model_32_greedy_tokens_on_three_chat_prompts(smollm2_dir, smollm2_bundle):
    result = validate(smollm2_dir, smollm2_bundle, steps=32)
    print(table(result))
    assert result.passed, table(result)
    assert [p["greedy_match"] for p in result.backends[0].prompts] == [32, 32, 32]


@pytest.mark.slow
def test_default_model_int4_passes_validate(smollm2_dir, tmp_path):
    """The real default model, quantized: the graph is exact against the quantized reference, and ONNX
    Runtime's int8-activation kernel stays inside the int4 row."""
    from qwen2edge.exporter.quantize import QuantizeOptions

    out = tmp_path / "int4"
    export_bundle(smollm2_dir, out, ExportOptions(max_seq_len=128, trt_check=None,
                                                  quantize=QuantizeOptions("int4", 32, True)))
    result = validate(smollm2_dir, out, steps=8, prompts=PROMPTS[:1] + PROMPTS[-1:])
    print(table(result))
    assert result.passed, table(result)
    assert result.backend("ort-graph").summary["max_abs"] < 1e-3
    assert result.storage_cost[0]["ppl_quantized"] > result.storage_cost[0]["ppl_checkpoint"]


@pytest.mark.slow
def test_default_model_answers_paris(smollm2_bundle):
    from qwen2edge.runtime import api
    from qwen2edge.runtime.sampling import SamplingParams

    out = api.generate(smollm2_bundle, prompt="What is the capital of France?", chat=True,
                       params=SamplingParams(max_new_tokens=24))
    assert "Paris" in out["text"]


def test_table_columns_align_for_wide_characters():
    from qwen2edge.validation.validate import _cell

    assert _cell("用一句话", 6) == "用一句"  # three 2-column characters fill 6 columns
    assert _cell("abc", 5) == "abc  "
    assert _cell("用a", 4) == "用a "

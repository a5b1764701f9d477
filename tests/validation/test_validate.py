"""`validate` against transformers: passes on correct bundles, fails (exit 5) on broken ones."""

import json

import pytest

from qwen2edge.config import load_hf_config
from qwen2edge.errors import ValidationError
from qwen2edge.exporter.export import ExportOptions, export_bundle
from qwen2edge.validation.validate import DEFAULT_PROMPTS, require_pass, validate

from ..test_cli import run_cli


def test_fp32_bundle_passes_with_tight_errors(tiny_bundle_factory):
    model, bundle = tiny_bundle_factory("gqa")
    report = validate(model, bundle, steps=8)
    assert report.passed, report.table()
    assert report.max_abs < 1e-4 and report.min_top1 == 1.0
    assert all(p.greedy_match == p.greedy_steps == 8 for p in report.prompts)
    assert len(report.prompts) == len(DEFAULT_PROMPTS)


def test_fp16_bundle_passes_fp16_tolerance(tiny_bundle_factory):
    model, bundle = tiny_bundle_factory("gqa", dtype="fp16")
    report = validate(model, bundle, steps=8)
    assert report.passed, report.table()
    assert 1e-5 < report.max_abs < 0.5  # really half precision, and still close


def test_wrong_rotary_table_fails(tiny_model_factory, tmp_path):
    model = tiny_model_factory("gqa")
    cfg, _ = load_hf_config(model)
    broken = tmp_path / "broken"
    export_bundle(model, broken, ExportOptions(max_seq_len=64), cfg_override=cfg.replace(rope_theta=cfg.rope_theta * 2))
    report = validate(model, broken, steps=4)
    assert not report.passed and any("max |delta logit|" in f for f in report.failures)
    with pytest.raises(ValidationError):
        require_pass(report)


def test_cli_validate_json_and_exit_code(tiny_bundle_factory, tiny_model_factory):
    model, bundle = tiny_bundle_factory("mqa_tied")
    proc = run_cli("validate", str(model), str(bundle), "--steps", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["passed"] and data["reference"].startswith("transformers")
    # The same bundle against a different checkpoint must fail with the validation exit code.
    other = tiny_model_factory("gqa")
    proc = run_cli("validate", str(other), str(bundle), "--steps", "4")
    assert proc.returncode == ValidationError.exit_code
    assert proc.stderr.strip().splitlines()[-1].startswith("error: validation failed")


@pytest.mark.slow
def test_default_model_32_greedy_tokens_on_three_chat_prompts(smollm2_dir, smollm2_bundle):
    report = validate(smollm2_dir, smollm2_bundle, steps=32)
    print(report.table())
    assert report.passed, report.table()
    assert [p.greedy_match for p in report.prompts] == [32, 32, 32]


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

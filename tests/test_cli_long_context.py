"""Long context through the CLI: export overrides, the manifest record, generate and validate, bad input."""

import json

import pytest

from qwen2edge.errors import InputError

from .test_cli import assert_one_line_error, run_cli


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


@pytest.mark.slow
def test_export_with_yarn_overrides_records_them(tiny_model_factory, tmp_path):
    model = tiny_model_factory("gqa")  # plain RoPE in config.json
    out = tmp_path / "b"
    proc = run_cli("export", str(model), "-o", str(out), "--max-seq-len", "200", "--rope-scaling", "yarn",
                   "--rope-factor", "4", "--original-max-position-embeddings", "128")
    assert proc.returncode == 0, proc.stderr
    m = _manifest(out)
    lc = m["long_context"]
    assert lc["mode"] == "yarn" and lc["overrides"] == {"rope_scaling": "yarn", "rope_factor": 4.0,
                                                        "original_max_position_embeddings": 128}
    assert m["model_config"]["rope_scaling"]["factor"] == 4.0
    assert m["model_config"]["rope_scaling"]["original_max_position_embeddings"] == 128
    gen = run_cli("generate", str(out), "--prompt-ids", ",".join(["9707"] * 150), "--max-new-tokens", "20", "--json",
                  block_torch=True)
    assert gen.returncode == 0, gen.stderr
    assert len(json.loads(gen.stdout)["token_ids"]) == 20


@pytest.fixture(scope="module")
def yarn_plus_dca_bundle(tiny_model_factory, tmp_path_factory):
    """The YaRN tiny model with DCA added at export: DCA must win, and say so."""
    model = tiny_model_factory("yarn")
    out = tmp_path_factory.mktemp("yarn-dca") / "b"
    proc = run_cli("export", str(model), "-o", str(out), "--max-seq-len", "96", "--dca-chunk-size", "16",
                   "--dca-local-size", "4", "--dca-original-max-position-embeddings", "32")
    assert proc.returncode == 0, proc.stderr
    return model, out, proc.stderr


def test_both_yarn_and_dca_dca_wins_logged_and_recorded(yarn_plus_dca_bundle):
    _, out, stderr = yarn_plus_dca_bundle
    assert "DCA wins and YaRN is ignored" in stderr
    m = _manifest(out)
    assert m["long_context"]["mode"] == "dca" and m["model_config"]["rope_scaling"] is None
    assert any("DCA wins" in n for n in m["long_context"]["notes"])
    assert m["io_spec"]["dca"] is True


def test_dca_generation_longer_than_the_chunk_period(yarn_plus_dca_bundle):
    """Period 12: a 5-token prompt + 40 new tokens crosses three chunk boundaries, torch-free."""
    _, out, _ = yarn_plus_dca_bundle
    proc = run_cli("generate", str(out), "--prompt-ids", "40,1079,264,1273,13", "--max-new-tokens", "40", "--json",
                   block_torch=True)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert len(res["token_ids"]) == 40 and res["finish_reason"] == "length"


@pytest.mark.slow
def test_validate_dca_names_its_reference(yarn_plus_dca_bundle):
    model, out, _ = yarn_plus_dca_bundle
    proc = run_cli("validate", str(model), str(out), "--steps", "6", "--long-prompt-tokens", "40")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reference: qwen2edge float64 reference" in proc.stdout
    assert "transformers has no Dual Chunk Attention" in proc.stdout
    assert "<long prompt, 40 tokens>" in proc.stdout and "PASS" in proc.stdout


@pytest.mark.slow
def test_validate_yarn_beyond_original_length_against_transformers(tiny_bundle_factory):
    model, bundle = tiny_bundle_factory("yarn", max_seq_len=256)
    proc = run_cli("validate", str(model), str(bundle), "--steps", "8", "--long-prompt-tokens", "160", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["reference"]["name"].startswith("transformers") and rep["passed"]
    assert rep["bundle"]["long_context"].startswith("YaRN")
    assert rep["backends"][0]["prompts"][-1]["prompt_tokens"] == 160 and not rep["notes"]


@pytest.mark.parametrize("args, needle", [
    (["--rope-scaling", "dynamic"], "unknown --rope-scaling 'dynamic'"),
    (["--rope-scaling", "yarn"], "YaRN needs a rope scaling factor > 1 (got None)"),
    (["--rope-scaling", "yarn", "--rope-factor", "1"], "factor > 1"),
    (["--dca-chunk-size", "16", "--dca-local-size", "16"], "local_size < chunk_size"),
    (["--dca-chunk-size", "16"], "pass --dca-chunk-size and --dca-local-size"),
    (["--dca-chunk-size", "1024", "--dca-local-size", "8"], "exceeds the model's max_position_embeddings 512"),
    (["--max-seq-len", "1024"], "exceeds what this model supports (its rotary table covers 512 positions)"),
])
def test_bad_long_context_input_is_one_line(args, needle, tiny_model_factory, tmp_path):
    model = tiny_model_factory("gqa")
    proc = run_cli("export", str(model), "-o", str(tmp_path / "out"), *args)
    assert_one_line_error(proc, InputError.exit_code, needle)
    assert not (tmp_path / "out").exists()

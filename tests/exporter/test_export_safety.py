"""`qwen2edge export` as a careless user runs it: it never deletes what is at the output path, never
writes over its own input, refuses absurd lengths and bad tokenizer files in one line, exit 2."""

import json
import shutil
import time

import pytest

from qwen2edge.errors import InputError
from qwen2edge.exporter.export import ExportOptions, export_bundle
from qwen2edge.runtime.bundle import Bundle

from ..test_cli import assert_one_line_error, run_cli


@pytest.fixture
def model(tiny_model_factory, tmp_path):
    """A private copy of the tiny gqa checkpoint."""
    shutil.copytree(tiny_model_factory("gqa"), tmp_path / "model")
    return tmp_path / "model"


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_export_never_deletes_a_directory_it_did_not_write(model, tmp_path):
    """`mkdir d; echo x > d/keep; qwen2edge export CKPT -o d` used to delete keep."""
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep").write_text("x")
    proc = run_cli("export", str(model), "-o", str(out), "--overwrite")
    assert_one_line_error(proc, InputError.exit_code, "holds keep, which no qwen2edge manifest there lists")
    assert "pass another --output" in proc.stderr
    assert (out / "keep").read_text() == "x" and _leftovers(tmp_path) == []


def test_export_never_writes_over_its_input(model):
    """`qwen2edge export M -o M` used to delete the checkpoint."""
    before = sorted(p.name for p in model.iterdir())
    proc = run_cli("export", str(model), "-o", str(model), "--overwrite")
    assert_one_line_error(proc, InputError.exit_code, f"the output {model} is the input")
    assert sorted(p.name for p in model.iterdir()) == before
    proc = run_cli("export", str(model), "-o", str(model.parent), "--overwrite")  # a directory holding it
    assert_one_line_error(proc, InputError.exit_code, "contains the input")


def test_export_replaces_an_earlier_bundle_only_with_overwrite(model, tmp_path):
    out = tmp_path / "bundle"
    export_bundle(model, out, ExportOptions(max_seq_len=32, trt_check=None))
    t0 = time.monotonic()
    proc = run_cli("export", str(model), "-o", str(out), "--max-seq-len", "48", "--trt-check", "none")
    assert_one_line_error(proc, InputError.exit_code, "already holds a qwen2edge artifact: pass --overwrite")
    assert time.monotonic() - t0 < 60  # refused before loading and tracing (the flag once did not exist)
    assert Bundle.open(out).max_seq_len == 32
    export_bundle(model, out, ExportOptions(max_seq_len=48, trt_check=None), overwrite=True)  # what --overwrite does
    assert Bundle.open(out).max_seq_len == 48 and _leftovers(tmp_path) == []


def test_dca_export_with_an_absurd_max_seq_len_is_refused_in_one_line(tiny_model_factory, tmp_path):
    """--max-seq-len 10**9 with DCA (no rotary limit) once grew to 23 GB and was killed, leaving a
    .partial directory."""
    out = tmp_path / "out"
    proc = run_cli("export", str(tiny_model_factory("dca")), "-o", str(out), "--max-seq-len", str(10**9))
    assert_one_line_error(proc, InputError.exit_code, "--max-seq-len 1000000000 is beyond qwen2edge's limit")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_long_dca_export_traces_without_a_full_length_cache(tiny_model_factory, tmp_path):
    """The trace's sample cache is short (past_len is a graph dimension): a 1M-token DCA bundle exports
    like a short one and still runs."""
    out = tmp_path / "long"
    export_bundle(tiny_model_factory("dca"), out, ExportOptions(max_seq_len=2**20, trt_check=None))
    bundle = Bundle.open(out)
    from qwen2edge.runtime.sampling import SamplingParams

    results, _ = bundle.generator().generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, stop_token_ids=(-1,)))
    assert bundle.max_seq_len == 2**20 and len(results[0].token_ids) == 3


@pytest.mark.parametrize("name, content, needle", [
    ("tokenizer.json", "{not json", "tokenizer.json could not be read"),
    ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json must hold a JSON object"),
    ("tokenizer_config.json", json.dumps({"chat_template": "{% if %}"}), "chat_template does not compile"),
    ("generation_config.json", "garbage", "generation_config.json is not valid JSON"),
    ("generation_config.json", json.dumps({"eos_token_id": "</s>"}), "eos_token_id '</s>'"),
    ("special_tokens_map.json", "\xff", "special_tokens_map.json is not valid JSON"),
])
def test_garbage_tokenizer_files_are_refused_not_copied(model, tmp_path, name, content, needle):
    (model / name).write_text(content, encoding="latin-1")
    out = tmp_path / "out"
    t0 = time.monotonic()
    with pytest.raises(InputError, match=needle) as exc:
        export_bundle(model, out, ExportOptions(max_seq_len=32, trt_check=None))
    assert "\n" not in str(exc.value) and time.monotonic() - t0 < 30  # before loading the weights
    assert not out.exists()


@pytest.mark.parametrize("args, patch, needle", [
    (["--rope-scaling", "yarn", "--rope-factor", "nan"], {}, "finite rope scaling factor > 1 (got nan)"),
    (["--rope-scaling", "yarn", "--rope-factor", "inf"], {}, "--rope-factor"),
    ([], {"num_hidden_layers": "2"}, "num_hidden_layers must be an integer, got '2'"),
    ([], {"intermediate_size": -96}, "intermediate_size must be an integer >= 1"),
])
def test_bad_config_values_exit_2_in_one_line(model, tmp_path, args, patch, needle):
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **patch}))
    proc = run_cli("export", str(model), "-o", str(tmp_path / "out"), *args)
    assert_one_line_error(proc, InputError.exit_code, needle)

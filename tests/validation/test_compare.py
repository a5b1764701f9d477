"""`qwen2edge compare` end to end on tiny models: reports, a deliberately broken layer, the HTML in Chromium."""

import importlib.util
import json
import shutil
import subprocess

import pytest

from qwen2edge.errors import InputError, ValidationError
from qwen2edge.exporter.export import ExportOptions, export_bundle
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.manifest import write_manifest
from qwen2edge.validation.compare import compare, compare_to_report
from qwen2edge.validation.prompts import BUILTIN
from qwen2edge.validation.report import write_report
from qwen2edge.validation.results import SCHEMA, SCHEMA_VERSION

from ..test_cli import assert_one_line_error, run_cli

FEW = tuple(p for p in BUILTIN if p.id in ("en-capital", "zh-intro", "ppl-en", "ppl-code"))


@pytest.fixture(scope="module")
def fp32_report(tiny_bundle_factory, tmp_path_factory):
    model, bundle = tiny_bundle_factory("gqa")
    report = compare(model, bundle, prompts=FEW, steps=4).to_dict()
    out = write_report(report, tmp_path_factory.mktemp("report") / "r")
    return report, out


def test_fp32_report_passes_with_tight_errors(fp32_report):
    report, out = fp32_report
    assert report["passed"] and report["schema"] == SCHEMA and report["schema_version"] == SCHEMA_VERSION
    assert report["preset"] == "compare" and report["reference"]["name"].startswith("transformers")
    (b,) = report["backends"]
    s = b["summary"]
    assert b["backend"] == "ort" and b["failures"] == []
    assert s["max_abs"] < 1e-4 and s["min_cosine"] > 0.99999 and s["top1"] == 1.0 and s["top5"] == 1.0
    assert s["greedy_match"] == s["greedy_steps"] == 8 and s["steps_compared"] == 8
    assert [len(p["steps"]) for p in b["prompts"]] == [4, 4]
    assert [q["id"] for q in b["perplexity"]] == ["ppl-en", "ppl-code"]
    assert all(q["ppl_ref"] > 1 and q["delta_rel"] < 1e-4 for q in b["perplexity"])
    lay = report["layers"]
    assert lay["source"].startswith("debug re-export") and [r["name"] for r in lay["rows"]] == [
        "embeddings", "layer 0", "layer 1 + final norm"]
    assert lay["first_over"] is None and max(r["rel_l2"] for r in lay["rows"]) < 1e-5 and lay["passed"]
    # What was written is what was computed; the markdown carries the verdict and the summary row.
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    md = (out / "report.md").read_text()
    assert md.startswith("# qwen2edge compare: PASS") and "| ort | fp32 |" in md and "## Per-layer drift" in md
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "report.html", "report.json", "report.md"]
    # The shipped graph stays free of debug outputs; only the temporary re-export had them.
    assert not any(n.startswith("hidden_state.") for n in Bundle.open(report["bundle_dir"]).spec.output_names)


def test_report_never_replaces_a_directory_with_other_files(fp32_report, tmp_path):
    report, _ = fp32_report
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds notes.txt, which no qwen2edge manifest there lists"):
        write_report(report, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    write_report(report, tmp_path / "r")
    with pytest.raises(InputError, match="already holds a qwen2edge artifact: pass overwrite"):
        write_report(report, tmp_path / "r")
    write_report(report, tmp_path / "r", overwrite=True)  # an older report is replaced when asked
    assert (tmp_path / "r" / "report.html").is_file()
    (tmp_path / "r" / "mine.txt").write_text("x")  # a file of the user's inside it: never replaced
    with pytest.raises(InputError, match="mine.txt"):
        write_report(report, tmp_path / "r", overwrite=True)


def test_fp16_report_is_half_precision_and_passes_fp16_thresholds(tiny_bundle_factory):
    model, bundle = tiny_bundle_factory("gqa", dtype="fp16")
    report = compare(model, bundle, prompts=FEW[:1], steps=4).to_dict()
    s = report["backends"][0]["summary"]
    assert report["passed"], report["failures"]
    assert report["dtype"] == "fp16" and report["backends"][0]["thresholds"]["max_abs"] == 0.5
    assert 1e-5 < s["max_abs"] < 0.5 and s["mean_kl"] > 0
    assert max(r["rel_l2"] for r in report["layers"]["rows"]) > 1e-5  # the debug re-export is fp16 too


def _break_layer(src, dst, layer: int, scale: float):
    """Copy a checkpoint and scale one layer's MLP output projection."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    w[f"model.layers.{layer}.mlp.down_proj.weight"] = (w[f"model.layers.{layer}.mlp.down_proj.weight"] * scale)
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.slow
def test_broken_layer_fails_and_the_layer_view_points_at_it(tiny_model_factory, tmp_path):
    model = tiny_model_factory("deep4", num_layers=4)
    _break_layer(model, tmp_path / "broken-model", layer=1, scale=3.0)
    bundle = tmp_path / "broken-bundle"
    export_bundle(tmp_path / "broken-model", bundle, ExportOptions(max_seq_len=64, debug_hidden_states=True))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "What is the capital of France?", "id": "q"}\n', encoding="utf-8")
    report_dir = tmp_path / "report"
    proc = run_cli("compare", str(model), str(bundle), "--steps", "3", "--prompts", str(prompts),
                   "--report", str(report_dir), "--json")
    assert_one_line_error(proc, ValidationError.exit_code, "compare failed")
    report = json.loads(proc.stdout)
    assert report == json.loads((report_dir / "report.json").read_text())  # written even when failing
    lay = report["layers"]
    assert lay["source"] == "bundle (debug export)"
    rel = [r["rel_l2"] for r in lay["rows"]]
    assert rel[0] < 1e-6 and rel[1] < 1e-5  # embeddings and layer 0 still match
    assert lay["first_over"] == 2 and lay["first_over_name"] == "layer 1"
    assert lay["largest_jump_name"] == "layer 1" and rel[2] > 0.1
    assert any(f.startswith("error enters at layer 1") for f in lay["failures"]) and not lay["passed"]
    assert any(f.startswith("max_abs") for f in report["backends"][0]["failures"])
    assert "| layer 1 **<- error enters** |" in (report_dir / "report.md").read_text()


@pytest.mark.slow
def test_cli_prompts_file_threshold_override_and_exit_code(tiny_bundle_factory, tmp_path):
    model, bundle = tiny_bundle_factory("gqa")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "Hello there", "id": "hi", "chat": false}\n'
                       '{"text": "One two three four five six.", "id": "t", "kind": "perplexity"}\n', encoding="utf-8")
    out = tmp_path / "r"
    proc = run_cli("compare", str(model), str(bundle), "--prompts", str(prompts), "--steps", "2", "--no-layers",
                   "--threshold", "max_abs=1e-12", "--report", str(out))
    assert_one_line_error(proc, ValidationError.exit_code, "max_abs")
    assert "| ort | fp32 |" in proc.stdout and "FAIL" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["threshold_overrides"] == {"max_abs": 1e-12} and report["layers"] is None
    assert [p["id"] for p in report["prompts"]] == ["hi", "t"] and not report["passed"]
    ok = run_cli("compare", str(model), str(bundle), "--prompts", str(prompts), "--steps", "2", "--no-layers",
                 "--report", str(out), "--overwrite")  # the failed run's report is replaced only when asked
    assert ok.returncode == 0, ok.stderr
    assert "PASS" in ok.stdout and json.loads((out / "report.json").read_text())["passed"]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_trt_backend_without_tensorrt_is_a_one_line_error(tiny_bundle_factory, tmp_path):
    model, bundle = tiny_bundle_factory("gqa")
    proc = run_cli("compare", str(model), str(bundle), "--backend", "ort", "--backend", "trt",
                   "--report", str(tmp_path / "r"))
    assert proc.returncode not in (0, ValidationError.exit_code)
    assert_one_line_error(proc, proc.returncode, "TensorRT")
    assert not (tmp_path / "r").exists()  # no report, so nothing can claim TensorRT results


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
# Appended to a copy of the page: records each chart's rendered size and mark count into the DOM.
PROBE = """<script>document.body.setAttribute('data-probe', JSON.stringify(
[...document.querySelectorAll('svg.chart')].map(s => { const b = s.getBBox(); const r = s.getBoundingClientRect();
 return {id: s.id, w: b.width, h: b.height, shown: r.width * r.height,
         marks: s.querySelectorAll('polyline.series, rect.bar').length}; })));</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium: apt-get install -y chromium (.ci/run does this)")
def test_html_report_renders_in_headless_chromium(fp32_report, tmp_path):
    _, out = fp32_report
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]
    proc = subprocess.run([_chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    start = proc.stdout.index('data-probe="') + len('data-probe="')
    probe = json.loads(proc.stdout[start:proc.stdout.index('"', start)].replace("&quot;", '"'))
    charts = {c["id"]: c for c in probe}
    assert set(charts) == {"chart-step-error", "chart-top1", "chart-layer-error", "chart-histogram-ort"}
    for c in charts.values():
        assert c["w"] > 100 and c["h"] > 100 and c["shown"] > 0 and c["marks"] > 0, c
    assert charts["chart-layer-error"]["marks"] >= 2  # the embeddings bar is log(0): not drawn
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, "--window-size=1100,1800", f"--screenshot={shot}", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000  # a real picture, not a blank page


@pytest.mark.slow
def test_default_model_fp32_passes_its_thresholds(smollm2_dir, smollm2_bundle):
    """The fp32 thresholds hold on the real default model, not only on tiny random ones."""
    prompts = tuple(p for p in BUILTIN if p.id in ("en-capital", "zh-intro", "ppl-math"))
    result = compare(smollm2_dir, smollm2_bundle, prompts=prompts, steps=8, layers=False)
    (b,) = result.backends
    assert result.passed, result.failures
    assert b.summary["greedy_match"] == 16 and 1 < b.perplexity[0]["ppl_ref"] < 1000


def test_the_report_directory_is_checked_before_comparing(tiny_bundle_factory, tmp_path):
    """Its inputs are never the report directory, and an earlier report needs --overwrite: refused at once,
    not after minutes of comparing."""
    model, bundle = tiny_bundle_factory("gqa")
    with pytest.raises(InputError, match="is the input"):
        compare_to_report(model, bundle, report_dir=bundle, overwrite=True)
    (tmp_path / "r").mkdir()
    write_manifest(tmp_path / "r", {"kind": "compare-report"})
    proc = run_cli("compare", str(model), str(bundle), "--report", str(tmp_path / "r"), "--no-layers")
    assert_one_line_error(proc, InputError.exit_code, "already holds a qwen2edge artifact: pass --overwrite")

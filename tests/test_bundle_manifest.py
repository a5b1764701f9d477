"""BundleManifest is the bundle's root of trust: every file the runtime loads must be listed, verified
and inside the bundle, and every value must parse; a hand-edited manifest is refused in one line."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from qwen2edge.device_bundle import pack_bundle
from qwen2edge.errors import BundleError, InputError
from qwen2edge.manifest import MANIFEST
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.ort_backend import ORT_CACHE

from .test_cli import assert_one_line_error, run_cli


@pytest.fixture
def bundle(tiny_bundle_factory, tmp_path) -> Path:
    """A private copy of the tiny gqa bundle, free to tamper with."""
    _, src = tiny_bundle_factory("gqa")
    shutil.copytree(src, tmp_path / "b", ignore=shutil.ignore_patterns(ORT_CACHE))
    return tmp_path / "b"


@pytest.fixture(scope="module")
def other_model(tiny_bundle_factory) -> bytes:
    """model.onnx of another bundle: what a swap puts in place."""
    return (tiny_bundle_factory("mqa_tied")[1] / "model.onnx").read_bytes()


def _edit(bundle: Path, change) -> None:
    m = json.loads((bundle / MANIFEST).read_text())
    change(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


def _entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_an_untouched_bundle_opens(bundle):
    assert Bundle.open(bundle).manifest.files["model.onnx"].bytes > 0


@pytest.mark.parametrize("how, needle", [
    ("no_files", "lists no files"),  # once: nothing verified, the swapped model ran
    ("empty_files", "lists no files"),
    ("model_entry_dropped", "does not list model.onnx"),
    ("tokenizer_entry_dropped", "does not list tokenizer.json"),
])
def test_emptying_the_manifest_cannot_let_a_swapped_model_run(bundle, other_model, how, needle):
    def change(m):
        if how == "no_files":
            del m["files"]
        elif how == "empty_files":
            m["files"] = {}
        else:
            del m["files"]["model.onnx" if how == "model_entry_dropped" else "tokenizer.json"]

    _edit(bundle, change)
    (bundle / "model.onnx").write_bytes(other_model)
    with pytest.raises(BundleError, match=needle):
        Bundle.open(bundle)


@pytest.mark.parametrize("model_file", ["/etc/hostname", "../x.onnx", "sub/../../x.onnx"])
def test_model_file_must_stay_inside_the_bundle(bundle, model_file):
    outside = bundle.parent / "x.onnx"
    shutil.copyfile(bundle / "model.onnx", outside)

    def change(m):
        m["model_file"] = model_file
        if not model_file.startswith("/"):
            m["files"][model_file] = _entry(outside)

    _edit(bundle, change)
    with pytest.raises(BundleError, match="outside"):
        Bundle.open(bundle)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json", "model.onnx.data"])
def test_a_file_the_runtime_reads_must_be_listed(bundle, name):
    def change(m):
        m["files"].pop(name, None)
        m["tokenizer_files"] = [f for f in m["tokenizer_files"] if f != name]

    _edit(bundle, change)
    (bundle / name).write_text('{"eos_token_id": 7}')  # a swap the checksums no longer see
    with pytest.raises(BundleError, match=f"{name} is not listed in"):
        Bundle.open(bundle)


@pytest.mark.parametrize("change, needle", [
    (lambda m: m["files"]["model.onnx"].pop("bytes"), "malformed entry for 'model.onnx'"),  # once exit 1
    (lambda m: m["model_config"].update(num_hidden_layers="two"), "num_hidden_layers must be an integer"),
    (lambda m: m["model_config"].update(rope_theta=float("nan")), "rope_theta must be a finite positive"),
    (lambda m: m["model_config"].update(vocab_size=0), "vocab_size must be an integer >= 1"),
])
def test_malformed_values_are_one_line_bundle_errors(bundle, change, needle):
    _edit(bundle, change)
    with pytest.raises(BundleError, match=needle) as exc:
        Bundle.open(bundle)
    assert "\n" not in str(exc.value)


def test_garbage_generation_config_is_a_one_line_error_at_load(bundle):
    (bundle / "generation_config.json").write_text("{not json")
    _edit(bundle, lambda m: m["files"].update({"generation_config.json": _entry(bundle / "generation_config.json")}))
    with pytest.raises(InputError, match="generation_config.json is not valid JSON"):
        Bundle.open(bundle).generator()
    (bundle / "generation_config.json").write_text('{"eos_token_id": "end"}')
    _edit(bundle, lambda m: m["files"].update({"generation_config.json": _entry(bundle / "generation_config.json")}))
    proc = run_cli("generate", str(bundle), "--prompt-ids", "1,2", "--max-new-tokens", "2", block_torch=True)
    assert_one_line_error(proc, InputError.exit_code, "eos_token_id 'end'")


@pytest.mark.parametrize("outside", ["../secret", "/etc/hostname"])
def test_bundle_never_packs_a_listed_path_outside_the_bundle(bundle, tmp_path, outside):
    secret = bundle.parent / "secret"
    secret.write_text("password")
    path = secret if outside == "../secret" else Path(outside)
    if not path.is_file():
        pytest.skip(f"{path} does not exist here")
    _edit(bundle, lambda m: m["files"].update({outside: _entry(path)}))  # checksums right: only the path is wrong
    out = tmp_path / "x.tar.gz"
    with pytest.raises(BundleError, match="a path outside its directory"):
        pack_bundle(bundle, out)
    assert not out.exists()


def test_the_cli_refuses_an_emptied_manifest_in_one_line(bundle, other_model):
    _edit(bundle, lambda m: m.pop("files"))
    (bundle / "model.onnx").write_bytes(other_model)
    proc = run_cli("generate", str(bundle), "--prompt-ids", "1,2", "--max-new-tokens", "2", block_torch=True)
    assert_one_line_error(proc, BundleError.exit_code, "lists no files")

"""`qwen2edge triton-repo`: the repository it writes, and what it refuses (one-line errors, nothing clobbered)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ..test_cli import assert_one_line_error, run_cli
from .conftest import write_repo
from qwen2edge.errors import BundleError, InputError
from qwen2edge.manifest import read_manifest, write_manifest
from qwen2edge.triton import repo as repo_module
from qwen2edge.triton.config import ModelSettings


def parameters(config: str) -> dict[str, str]:
    out = {}
    for line in config.splitlines():
        if line.startswith("parameters:"):
            key = line.split('key: "', 1)[1].split('"', 1)[0]
            out[key] = json.loads(line.split("string_value: ", 1)[1].rsplit(" } }", 1)[0])
    return out


def test_writes_config_model_and_manifest(tiny_bundle_factory, tmp_path):
    _, bundle = tiny_bundle_factory("gqa")
    repo = write_repo(bundle, tmp_path / "repo", "--name", "m", "--instances", "3", "--max-batch", "5")
    config = (repo / "m" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "model_transaction_policy { decoupled: true }" in config
    assert "instance_group [ { count: 3 kind: KIND_CPU } ]" in config
    params = parameters(config)
    settings = ModelSettings.from_parameters(params)
    assert settings == ModelSettings(bundle=str(bundle.resolve()), max_batch=5)
    # By default model.py finds this qwen2edge (the checkout or site-packages that holds it).
    assert str(Path(repo_module.__file__).resolve().parents[2]) in params["python_path"].split(":")
    template = Path(repo_module.__file__).with_name("model.py")
    assert (repo / "m" / "1" / "model.py").read_bytes() == template.read_bytes()
    manifest = read_manifest(repo)  # checksums of everything written
    assert manifest["kind"] == "qwen2edge-triton-repo" and set(manifest["files"]) == {"m/config.pbtxt", "m/1/model.py"}


def test_copy_bundle_makes_a_self_contained_repository(tiny_bundle_factory, tmp_path):
    _, bundle = tiny_bundle_factory("gqa")
    repo = write_repo(bundle, tmp_path / "repo", "--copy-bundle", "--python-path", "")
    params = parameters((repo / "qwen2edge" / "config.pbtxt").read_text())
    assert params["qwen2edge_bundle"] == "bundle" and params["python_path"] == ""
    copy = repo / "qwen2edge" / "1" / "bundle"
    assert read_manifest(copy)["files"] == read_manifest(bundle)["files"]


def test_rewrites_its_own_repository_but_nothing_else(tiny_bundle_factory, tmp_path):
    _, bundle = tiny_bundle_factory("gqa")
    repo = write_repo(bundle, tmp_path / "repo", "--instances", "1")
    (repo / "qwen2edge" / "1" / "__pycache__").mkdir()  # written by Triton at run time: fine
    (repo / "qwen2edge" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")
    proc = run_cli("triton-repo", str(bundle), "-o", str(repo), "--instances", "2")
    assert_one_line_error(proc, InputError.exit_code, "already holds a qwen2edge artifact: pass --overwrite")
    write_repo(bundle, repo, "--instances", "2", "--overwrite")
    assert "count: 2" in (repo / "qwen2edge" / "config.pbtxt").read_text()

    (repo / "other_model").mkdir()  # someone added a model of their own: never delete it
    (repo / "other_model" / "config.pbtxt").write_text("name: 'other'\n")
    proc = run_cli("triton-repo", str(bundle), "-o", str(repo), "--overwrite")
    assert_one_line_error(proc, InputError.exit_code, "holds other_model/config.pbtxt, which no qwen2edge manifest "
                                                      "there lists")
    assert (repo / "other_model" / "config.pbtxt").is_file()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = run_cli("triton-repo", str(bundle), "-o", str(foreign), "--overwrite")
    assert_one_line_error(proc, InputError.exit_code, "holds notes.txt, which no qwen2edge manifest there lists")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # Nor another qwen2edge output (here the bundle it serves, a directory holding it, or another bundle).
    for target in (bundle, bundle.parent, tiny_bundle_factory("mqa_tied")[1]):
        proc = run_cli("triton-repo", str(bundle), "-o", str(target), "--overwrite")
        assert_one_line_error(proc, InputError.exit_code, "is the input" if target == bundle else
                              "contains the input" if target == bundle.parent else "not a qwen2edge-triton-repo")


def test_refuses_a_bundle_failing_its_checksums(tiny_bundle_factory, tmp_path):
    _, bundle = tiny_bundle_factory("gqa")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "tokenizer.json").write_text((broken / "tokenizer.json").read_text().replace('"', "'", 1))
    proc = run_cli("triton-repo", str(broken), "-o", str(tmp_path / "repo"), block_torch=True)
    assert_one_line_error(proc, BundleError.exit_code, "tokenizer.json fails its manifest checksum")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("args, needle", [
    (["--backend", "trt"], "--backend trt needs a TensorRT engine"),
    (["--name", "bad/name"], "--name 'bad/name' is not a valid Triton model name"),
    (["--instances", "0"], "--instances must be at least 1"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--threads", "-1"], "--threads must be >= 0"),
])
def test_bad_options_are_one_line_errors(args, needle, tiny_bundle_factory, tmp_path):
    _, bundle = tiny_bundle_factory("gqa")
    proc = run_cli("triton-repo", str(bundle), "-o", str(tmp_path / "repo"), *args, block_torch=True)
    assert_one_line_error(proc, InputError.exit_code, needle)
    assert not (tmp_path / "repo").exists()


def test_tensorrt_repository_takes_the_engine_s_batch_and_gpu_instances(tiny_bundle_factory, tmp_path):
    """No TensorRT needed to write it (running it is untested on TensorRT): the engine's manifest gives the
    batch limit, instances are KIND_GPU, and --copy-bundle carries the engine along."""
    _, bundle = tiny_bundle_factory("gqa")
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "engine").mkdir()
    (copy / "engine" / "model.plan").write_bytes(b"plan")
    write_manifest(copy / "engine", {"kind": "tensorrt-engine", "limits": {"max_batch": 4}})
    repo = write_repo(copy, tmp_path / "repo", "--backend", "trt", "--copy-bundle")
    config = (repo / "qwen2edge" / "config.pbtxt").read_text()
    assert "kind: KIND_GPU" in config
    settings = ModelSettings.from_parameters(parameters(config))
    assert (settings.backend, settings.max_batch) == ("trt", 4)
    assert (repo / "qwen2edge" / "1" / "bundle" / "engine" / "model.plan").read_bytes() == b"plan"
    proc = run_cli("triton-repo", str(copy), "-o", str(tmp_path / "repo2"), "--backend", "trt", "--max-batch", "6")
    assert_one_line_error(proc, InputError.exit_code, "--max-batch 6 exceeds the engine's max batch 4")

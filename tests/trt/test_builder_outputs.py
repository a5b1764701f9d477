"""build-engine replaces BUNDLE/engine as a whole: never over files it did not write, over an earlier
engine only with --overwrite, never over its own --timing-cache. Checked before TensorRT is needed."""

import importlib.util
import shutil

import pytest

from qwen2edge.errors import BuildError, InputError
from qwen2edge.manifest import write_manifest
from qwen2edge.runtime.ort_backend import ORT_CACHE
from qwen2edge.trt.builder import EngineOptions, build_engine
from qwen2edge.trt.engine_manifest import ENGINE_DIR, PLAN_FILE

from ..test_cli import assert_one_line_error, run_cli

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture
def bundle(tiny_bundle_factory, tmp_path):
    _, src = tiny_bundle_factory("gqa")
    shutil.copytree(src, tmp_path / "b", ignore=shutil.ignore_patterns(ORT_CACHE))
    return tmp_path / "b"


def test_engine_directory_rules(bundle):
    engine = bundle / ENGINE_DIR
    engine.mkdir()
    (engine / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds notes.txt"):
        build_engine(bundle, EngineOptions(overwrite=True))
    assert (engine / "notes.txt").read_text() == "mine"
    (engine / "notes.txt").unlink()
    (engine / PLAN_FILE).write_bytes(b"an earlier engine")
    write_manifest(engine, {"kind": "tensorrt-engine"})
    with pytest.raises(InputError, match="already holds a qwen2edge artifact: pass overwrite"):
        build_engine(bundle, EngineOptions())
    with pytest.raises(InputError, match="contains the input .*timing.cache"):
        build_engine(bundle, EngineOptions(overwrite=True, timing_cache=str(engine / "timing.cache")))
    assert (engine / PLAN_FILE).read_bytes() == b"an earlier engine"


@pytest.mark.skipif(HAS_TRT, reason="checks the path up to the point where TensorRT is needed")
def test_with_overwrite_the_build_goes_on_to_tensorrt(bundle):
    engine = bundle / ENGINE_DIR
    engine.mkdir()
    (engine / PLAN_FILE).write_bytes(b"an earlier engine")
    write_manifest(engine, {"kind": "tensorrt-engine"})
    proc = run_cli("build-engine", str(bundle), block_torch=True)
    assert_one_line_error(proc, InputError.exit_code, "pass --overwrite to replace it")
    proc = run_cli("build-engine", str(bundle), "--overwrite", block_torch=True)
    assert_one_line_error(proc, BuildError.exit_code, "TensorRT is not installed")
    assert (engine / PLAN_FILE).read_bytes() == b"an earlier engine"  # untouched by a build that never ran

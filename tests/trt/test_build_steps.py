"""The build's own decisions around TensorRT calls, without TensorRT: timing-cache fallback and guards, the
plan written without a copy, the TF32 rule, the CUDA-major check, and the per-JetPack lint targets.

Where a test needs a builder config, it is a stand-in implementing only create_timing_cache /
set_timing_cache / get_timing_cache with TensorRT's documented return conventions (None / False on
failure); the point is qwen2edge's fallback logic, which is untested on TensorRT itself.
"""

import numpy as np
import pytest

from qwen2edge.errors import BuildError
from qwen2edge.trt.builder import attach_timing_cache, timing_cache_bytes, write_buffer
from qwen2edge.trt.engine_manifest import GpuInfo, engine_manifest, plan_build
from qwen2edge.trt.tensorrt_env import check_cuda_match, wheel_cuda_majors

ORIN = GpuInfo("Orin", "8.7")


class Cache:
    def __init__(self, data: bytes, serialize_error: Exception | None = None):
        self.data, self.serialize_error = data, serialize_error

    def serialize(self):
        if self.serialize_error:
            raise self.serialize_error
        return np.frombuffer(self.data + b"+new", np.uint8)  # buffer protocol, like IHostMemory


class Config:
    """create_timing_cache returns None for `bad` data (or raises), set_timing_cache False for `stale` data."""

    def __init__(self, bad=(), stale=(), raise_on=(), refuse_empty=False):
        self.bad, self.stale, self.raise_on, self.refuse_empty = set(bad), set(stale), set(raise_on), refuse_empty
        self.attached: Cache | None = None
        self.calls: list[tuple[str, bytes]] = []

    def create_timing_cache(self, data):
        self.calls.append(("create", bytes(data)))
        if bytes(data) in self.raise_on:
            raise RuntimeError("corrupt cache")
        return None if bytes(data) in self.bad else Cache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False  # a cache from another GPU must be detected, not used
        self.calls.append(("set", cache.data))
        if cache.data in self.stale or (self.refuse_empty and cache.data == b""):
            return False
        self.attached = cache
        return True

    def get_timing_cache(self):
        return self.attached


def test_a_good_timing_cache_is_loaded(tmp_path):
    path = tmp_path / "t.cache"
    path.write_bytes(b"good")
    config, notes = Config(), []
    cache = attach_timing_cache(config, path, notes.append)
    assert cache is config.attached and cache.data == b"good"
    assert not any("warning" in n for n in notes)
    assert timing_cache_bytes(config, notes.append) == b"good+new"


@pytest.mark.parametrize("kind", ["stale", "bad", "raise_on"])
def test_a_stale_or_corrupt_timing_cache_falls_back_to_a_fresh_one(tmp_path, kind):
    path = tmp_path / "t.cache"
    path.write_bytes(b"from-jetpack-6")
    config, notes = Config(**{kind: [b"from-jetpack-6"]}), []
    cache = attach_timing_cache(config, path, notes.append)
    assert cache is not None and cache.data == b"" and config.attached is cache
    assert [n for n in notes if "warning" in n] == [
        f"      warning: timing cache {path} is unreadable or from another TensorRT version or GPU: starting a fresh "
        "one (the file will be replaced)"]
    assert timing_cache_bytes(config, notes.append) == b"+new"  # the fresh cache replaces the stale file


def test_no_cache_at_all_builds_without_one(tmp_path):
    config, notes = Config(bad=[b""]), []
    assert attach_timing_cache(config, tmp_path / "missing.cache", notes.append) is None
    assert config.attached is None and "building without one" in notes[-1]
    config, notes = Config(refuse_empty=True), []
    assert attach_timing_cache(config, tmp_path / "missing.cache", notes.append) is None


@pytest.mark.parametrize("config", [Config(), "serialize-raises"])
def test_serializing_the_cache_after_a_build_never_raises(config):
    if config == "serialize-raises":
        config = Config()
        config.attached = Cache(b"x", serialize_error=RuntimeError("device lost"))
        expect = "could not serialize the timing cache (RuntimeError: device lost)"
    else:
        expect = "returned no timing cache"  # get_timing_cache() is None
    notes = []
    assert timing_cache_bytes(config, notes.append) is None
    assert expect in notes[-1] and "warning" in notes[-1]


def test_the_plan_is_written_from_its_buffer(tmp_path):
    plan = np.arange(1000, dtype=np.uint32)  # not bytes: a buffer-protocol object, as IHostMemory is
    size = write_buffer(tmp_path / "model.plan", plan)
    assert size == plan.nbytes == 4000
    assert (tmp_path / "model.plan").read_bytes() == plan.tobytes()


@pytest.mark.parametrize("trt", ["10.3.0", "11.4.1"])
def test_fp32_builds_clear_tf32_unless_asked(trt):
    plan = plan_build(trt, "fp32", None, ORIN)
    assert plan.cleared_flags == ("TF32",) and "cleared ['TF32']" in plan.description
    assert plan_build(trt, "fp32", None, ORIN, tf32=True).cleared_flags == ()
    assert plan_build(trt, "fp16", None, ORIN).cleared_flags == ()
    body = engine_manifest(trt_version=trt, gpu=ORIN, plan=plan, profiles=[], onnx_file="model.onnx",
                           onnx_sha256="0", bundle_dtype="fp32", limits={}, workspace_mib=None, opt_level=None,
                           timing_cache=None, build_seconds=1.0, qwen2edge_version="0")
    assert body["build"]["cleared_flags"] == ["TF32"]


def test_fp16_lowered_from_fp32_on_trt10_keeps_tf32_default():
    plan = plan_build("10.3.0", "fp32", "fp16", ORIN)
    assert plan.builder_flags == ("FP16",) and plan.cleared_flags == ()


def test_cuda_major_of_pip_wheels():
    assert wheel_cuda_majors({"tensorrt-cu13": "11.4.0", "tensorrt-cu13-libs": "11.4.0",
                              "tensorrt-cu13-bindings": "11.4.0"}) == {13}
    assert wheel_cuda_majors({"tensorrt-cu12-bindings": "10.3.0"}) == {12}
    assert wheel_cuda_majors({}) == set()


def test_a_tensorrt_newer_than_the_driver_is_refused_in_one_line():
    with pytest.raises(BuildError) as e:
        check_cuda_match("11.4.0", {13}, 12080)
    msg = str(e.value)
    assert "\n" not in msg
    assert "built for CUDA 13 but this NVIDIA driver supports CUDA up to 12.8" in msg
    assert "pip install 'qwen2edge[tensorrt-cu12]'" in msg
    with pytest.raises(BuildError, match="several CUDA majors"):
        check_cuda_match("10.16.0", {12, 13}, 13000)
    check_cuda_match("10.16.0", {12}, 13020)  # an older CUDA major runs on a newer driver
    check_cuda_match("10.13.2", {13}, 13000)
    check_cuda_match("10.3.0", set(), 12060)  # JetPack's TensorRT: no pip metadata, nothing to compare

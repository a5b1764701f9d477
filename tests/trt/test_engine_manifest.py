"""Build-path selection by TensorRT version, engine/device mismatch refusal, device cache copy offsets."""

import numpy as np
import pytest

from qwen2edge import io_spec
from qwen2edge.errors import BuildError, InferenceError, InputError
from qwen2edge.runtime.kv_cache import HostKVCache
from qwen2edge.runtime.trt_backend import kv_copy_plan
from qwen2edge.trt.device import make_gpu_info
from qwen2edge.trt.engine_manifest import (GpuInfo, check_engine_matches, engine_manifest, parse_version,
                                           plan_build)
from qwen2edge.trt.profiles import compute_profiles, resolve_limits

ORIN = GpuInfo("Orin", "8.7")
XAVIER = GpuInfo("Xavier", "7.2")


def test_parse_version():
    assert parse_version("10.3.0.30") == (10, 3, 0, 30)
    assert parse_version("11.4.1") == (11, 4, 1)
    with pytest.raises(InputError):
        parse_version("banana")


@pytest.mark.parametrize("trt", ["10.3.0", "10.16.0", "11.4.1"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_matching_precision_builds_strongly_typed_on_every_version(trt, dtype):
    plan = plan_build(trt, dtype, None, ORIN)
    assert plan.strongly_typed and plan.builder_flags == () and plan.precision == dtype
    assert plan_build(trt, dtype, dtype, ORIN) == plan


@pytest.mark.parametrize("want, flag", [("fp16", "FP16"), ("bf16", "BF16")])
def test_trt10_lowers_fp32_onnx_with_flag_names(want, flag):
    plan = plan_build("10.3.0.30", "fp32", want, ORIN)
    assert not plan.strongly_typed and plan.builder_flags == (flag,)
    assert plan.notes and "strongly typed" in plan.notes[0]


@pytest.mark.parametrize("want", ["fp16", "bf16"])
def test_trt11_refuses_a_precision_that_mismatches_the_onnx(want):
    with pytest.raises(InputError, match=rf"TensorRT 11.4.1 builds strongly typed.*--precision {want}.*--dtype {want}"):
        plan_build("11.4.1", "fp32", want, ORIN)
    with pytest.raises(InputError, match="strongly typed"):
        plan_build("11.4.1", "fp16", "fp32", ORIN)


def test_precision_cannot_be_raised_from_a_low_precision_onnx():
    with pytest.raises(InputError, match="cannot be recovered from a fp16 ONNX"):
        plan_build("10.3.0", "fp16", "fp32", ORIN)


def test_old_tensorrt_and_bf16_without_ampere_are_refused():
    with pytest.raises(BuildError, match="older than 10.3"):
        plan_build("8.6.2", "fp16", None, ORIN)
    with pytest.raises(BuildError, match="no bf16 support"):
        plan_build("10.3.0", "bf16", None, XAVIER)
    with pytest.raises(BuildError, match="no bf16 support"):
        plan_build("10.3.0", "fp32", "bf16", XAVIER)


def _manifest(trt="10.3.0.30", gpu=ORIN, sha="a" * 64):
    spec = io_spec.build_io_spec(2, 2, 16, 100, 64, "fp16")
    return engine_manifest(trt_version=trt, gpu=gpu, plan=plan_build(trt, "fp16", None, gpu),
                           profiles=compute_profiles(spec, resolve_limits(spec)), onnx_file="model.onnx",
                           onnx_sha256=sha, bundle_dtype="fp16", limits={"max_batch": 1}, workspace_mib=None,
                           opt_level=None, timing_cache=None, build_seconds=1.0, qwen2edge_version="0")


def test_engine_manifest_records_what_the_issue_asks_for():
    m = _manifest()
    assert m["tensorrt_version"] == "10.3.0.30" and m["gpu"] == {"name": "Orin", "compute_capability": "8.7"}
    assert m["precision"] == "fp16" and m["source_onnx"]["sha256"] == "a" * 64
    assert [p["name"] for p in m["profiles"]] == ["prefill", "decode"]


def test_matching_engine_is_accepted():
    check_engine_matches(_manifest(), "10.3.0.30", ORIN, "a" * 64, "b")


@pytest.mark.parametrize("trt, gpu, sha, needle", [
    ("10.3.0.26", ORIN, "a" * 64, "TensorRT 10.3.0.30, this device has 10.3.0.26"),
    ("10.3.0.30", GpuInfo("NVIDIA H100 80GB HBM3", "9.0"), "a" * 64, "this device has NVIDIA H100"),
    ("10.3.0.30", GpuInfo("Orin", "8.6"), "a" * 64, "sm 8.7"),
    ("10.3.0.30", ORIN, "b" * 64, "different model.onnx"),
])
def test_mismatched_engine_is_refused_in_one_line(trt, gpu, sha, needle):
    with pytest.raises(InferenceError) as exc:
        check_engine_matches(_manifest(), trt, gpu, sha, "bundle")
    msg = str(exc.value)
    assert needle in msg and "rebuild the engine on this device: qwen2edge build-engine bundle" in msg
    assert "\n" not in msg


def test_foreign_manifest_is_refused():
    with pytest.raises(InferenceError, match="not a qwen2edge engine manifest"):
        check_engine_matches({"kind": "onnx-bundle"}, "10.3", ORIN, "a", "b")


def test_gpu_info_from_raw_driver_values():
    assert make_gpu_info(b"Orin\x00\x00garbage", 8, 7) == ORIN
    assert make_gpu_info("NVIDIA H100 ", 9, 0).compute_capability == "9.0"


@pytest.mark.parametrize("seq, write_pos", [(5, [0, 0]), (1, [7, 3]), (3, [10, 0])])
def test_device_cache_copies_match_the_host_cache(seq, write_pos):
    """Emulate the device-to-device memcpys on byte buffers and compare with the host cache."""
    b, h, length, d = 2, 3, 16, 4
    spec = io_spec.build_io_spec(1, h, d, 10, length, "fp16")
    rng = np.random.default_rng(0)
    host = HostKVCache(spec, b)
    start = rng.standard_normal(host.arrays["past_key.0"].shape).astype(np.float16)
    for arr in host.arrays.values():
        arr[...] = start
    presents = {n.replace("past_", "present_"): rng.standard_normal((b, h, seq, d)).astype(np.float16)
                for n in host.arrays}
    device = {n: start.copy() for n in host.arrays}
    host.write(presents, np.array(write_pos))
    for name, dst in device.items():
        src = presents[name.replace("past_", "present_")]
        dst_bytes, src_bytes = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
        for dst_off, src_off, n in kv_copy_plan(b, h, length, d, seq, 2, write_pos):
            dst_bytes[dst_off:dst_off + n] = src_bytes[src_off:src_off + n]
        np.testing.assert_array_equal(dst, host.arrays[name])
    assert len(kv_copy_plan(b, h, length, d, seq, 2, write_pos)) == b * h


def test_device_cache_write_past_the_end_is_refused():
    with pytest.raises(InferenceError, match="overflows max_seq_len 16"):
        kv_copy_plan(1, 1, 16, 4, 2, 2, [15])


class _HostMemory:
    """Stands in for the TensorRT backend's copy primitives with memmove over host buffers, so the device
    cache's own pointer arithmetic (row views, row moves, per-row writes) runs for real on the CPU."""

    class Buffer:
        def __init__(self, arr: np.ndarray):
            self.arr, self.ptr, self.shape = arr, arr.ctypes.data, arr.shape

    def __init__(self, spec):
        self.spec = spec

    def dtype_of(self, name):
        return self.spec.tensor(name).dtype

    def copy_d2d(self, dst, src, nbytes):
        import ctypes

        ctypes.memmove(dst, src, nbytes)

    def zero(self, ptr, nbytes):
        import ctypes

        ctypes.memset(ptr, 0, nbytes)

    def device_array(self, name, shape):
        self.keep = getattr(self, "keep", []) + [np.full(shape, np.nan, np.float16)]
        return _HostMemory.Buffer(self.keep[-1])


def test_device_cache_protocol_matches_the_host_cache():
    from qwen2edge.runtime.trt_backend import DeviceKVCache

    b, h, length, d = 4, 2, 16, 4
    spec = io_spec.build_io_spec(2, h, d, 10, length, "fp16")
    mem = _HostMemory(spec)
    pool = {t.name: np.full((b, h, length, d), np.nan, np.float16) for t in spec.cache_inputs}
    device = DeviceKVCache(mem, {n: _HostMemory.Buffer(a) for n, a in pool.items()}, 0, b)
    device.reset()  # zeroes garbage, as a fresh device allocation needs
    host = HostKVCache(spec, b)
    rng = np.random.default_rng(1)
    for cache_pair, seq, pos in ((slice(0, 4), 3, [0, 0, 0, 0]), (slice(1, 3), 1, [3, 5])):
        dview, hview = device.view(cache_pair.start, cache_pair.stop), host.view(cache_pair.start, cache_pair.stop)
        assert dview.batch == hview.batch
        presents = {io_spec.present_name(n): rng.standard_normal((hview.batch, h, seq, d)).astype(np.float16)
                    for n in hview.arrays}
        hview.write(presents, np.array(pos))
        dview.write({k: _HostMemory.Buffer(v) for k, v in presents.items()}, np.array(pos))
    device.move_row(2, 0)
    host.move_row(2, 0)
    device.view(3, 4).reset()
    host.view(3, 4).reset()
    for name in pool:
        np.testing.assert_array_equal(pool[name], host.arrays[name])
    assert device.reserve(9) == device.fit(1) == length  # a device cache never grows along the sequence


def test_device_cache_partial_writes_prefix_copies_and_snapshots_match_the_host_cache():
    """Per-row write counts (a verify step's padding), a snapshot of a row's first slots and copying them into
    another row (prefix reuse), on the device cache's pointer arithmetic and on the host cache."""
    from qwen2edge.runtime.trt_backend import DeviceKVCache

    b, h, length, d = 3, 2, 16, 4
    spec = io_spec.build_io_spec(2, h, d, 10, length, "fp16")
    mem = _HostMemory(spec)
    pool = {t.name: np.zeros((b, h, length, d), np.float16) for t in spec.cache_inputs}
    device = DeviceKVCache(mem, {n: _HostMemory.Buffer(a) for n, a in pool.items()}, 0, b)
    host = HostKVCache(spec, b)
    rng = np.random.default_rng(2)
    presents = {io_spec.present_name(n): rng.standard_normal((b, h, 5, d)).astype(np.float16) for n in host.arrays}
    pos, counts = np.array([0, 4, 11]), np.array([5, 2, 0])
    host.write(presents, pos, counts)
    device.write({k: _HostMemory.Buffer(v) for k, v in presents.items()}, pos, counts)
    assert not host.arrays["past_key.0"][1, :, 6:].any() and not host.arrays["past_key.0"][2].any()
    snap_h, snap_d = host.snapshot(0, 5), device.snapshot(0, 5)
    assert snap_h.capacity == snap_d.capacity == 5 and snap_h.nbytes == snap_d.nbytes
    host.copy_rows_from(snap_h, 0, 2, 4)
    device.copy_rows_from(snap_d, 0, 2, 4)
    for name in pool:
        np.testing.assert_array_equal(pool[name], host.arrays[name])
        np.testing.assert_array_equal(host.arrays[name][2, :, :4], host.arrays[name][0, :, :4])
    with pytest.raises(InferenceError, match="overflows max_seq_len 16"):
        kv_copy_plan(1, 1, 16, 4, 5, 2, [13], counts=[4])
    assert len(kv_copy_plan(1, 1, 16, 4, 5, 2, [13], counts=[3])) == 1

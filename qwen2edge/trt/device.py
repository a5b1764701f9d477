"""The GPU's name and compute capability through the CUDA driver API (ctypes; no torch, no cuda-python).

The driver API's cuDeviceGetName / cuDeviceGetAttribute have had a stable C ABI since CUDA 2, and
libcuda ships with every NVIDIA driver, including JetPack's, so this works wherever TensorRT does.
Untested on a GPU (none here); the parsing of its results is tested.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from ..errors import InferenceError
from .engine_manifest import GpuInfo

# CUdevice_attribute values from cuda.h (documented, stable).
_CC_MAJOR = 75
_CC_MINOR = 76


def _driver() -> ctypes.CDLL:
    for name in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise InferenceError("the NVIDIA driver library (libcuda.so) was not found: run on a machine with an NVIDIA GPU "
                         "and driver (on Jetson, a JetPack install)")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise InferenceError(f"CUDA driver call {what} failed with error {rc}: check `nvidia-smi` (or `tegrastats` on "
                             "Jetson) and that no other process holds the GPU")


def gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device `device`."""
    cu = _driver()
    _check(cu.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(cu.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
    buf = ctypes.create_string_buffer(256)
    _check(cu.cuDeviceGetName(buf, 256, dev), "cuDeviceGetName")
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(cu.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, dev), "cuDeviceGetAttribute")
    _check(cu.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, dev), "cuDeviceGetAttribute")
    return make_gpu_info(buf.value, major.value, minor.value)


def driver_cuda_version() -> int:
    """The newest CUDA version the installed driver supports, as 1000 * major + 10 * minor (12080 = 12.8)."""
    cu = _driver()
    version = ctypes.c_int()
    _check(cu.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
    return version.value


def make_gpu_info(raw_name: bytes | str, major: int, minor: int) -> GpuInfo:
    """GpuInfo from the driver's raw values (NUL-padded bytes name)."""
    name = raw_name.decode("utf-8", "replace") if isinstance(raw_name, bytes) else raw_name
    return GpuInfo(name.split("\x00", 1)[0].strip(), f"{int(major)}.{int(minor)}")

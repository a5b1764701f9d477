"""Importing TensorRT: one-line errors, the CUDA major it was built for, and one process-wide logger.

pip's `tensorrt` metapackage follows the newest CUDA (TensorRT 11 for CUDA 13 as of 2026-10), which
fails at run time under a CUDA 12 driver; the per-CUDA wheels are `tensorrt-cu12` / `tensorrt-cu13`
(their -bindings / -libs distributions name the CUDA major). JetPack's python3-libnvinfer is a Debian
package with no pip metadata, so there the CUDA major is unknown and not checked (JetPack pairs them).
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

from ..errors import BuildError, Qwen2EdgeError

INSTALL_FIX = ("on x86-64 `pip install 'qwen2edge[tensorrt-cu12]'` (NVIDIA driver for CUDA 12.x) or "
               "'qwen2edge[tensorrt-cu13]' (CUDA 13.x driver; `nvidia-smi` shows the driver's CUDA version), "
               "on Jetson JetPack's python3-libnvinfer (docs/jetson.md)")
_WHEEL = re.compile(r"^tensorrt[-_]cu(\d+)(?:[-_](?:bindings|libs))?$", re.IGNORECASE)
_logger: Any = None


def tensorrt_wheels() -> dict[str, str]:
    """Installed pip TensorRT distributions that name a CUDA major: {name: version}."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name") or ""
        if _WHEEL.match(name):
            found[name.lower().replace("_", "-")] = dist.version
    return found


def wheel_cuda_majors(wheels: dict[str, str]) -> set[int]:
    return {int(m.group(1)) for name in wheels if (m := _WHEEL.match(name))}


def import_tensorrt(error: type[Qwen2EdgeError] = BuildError, fallback: str = "") -> Any:
    """`import tensorrt`, or one line saying it is missing / installed but broken, and the fix."""
    try:
        import tensorrt  # noqa: PLC0415 - deliberately lazy: optional, GPU-only dependency
    except ImportError as exc:
        wheels = tensorrt_wheels()
        if wheels:
            listed = ", ".join(f"{n} {v}" for n, v in sorted(wheels.items()))
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise error(f"TensorRT is installed ({listed}) but does not import ({detail}): reinstall one CUDA "
                        f"flavour only, {INSTALL_FIX}{fallback}") from None
        raise error(f"TensorRT is not installed: {INSTALL_FIX}{fallback}") from None
    return tensorrt


def check_cuda_match(trt_version: str, wheel_majors: set[int], driver_version: int | None) -> None:
    """Refuse, in one line, a TensorRT built for a newer CUDA major than the driver supports.

    `driver_version` is cuDriverGetVersion's value (1000 * major + 10 * minor, e.g. 12080); a driver
    runs any older CUDA major, so only a TensorRT whose CUDA major is newer fails (at run time, late)."""
    if driver_version is None or not wheel_majors:
        return
    if len(wheel_majors) > 1:
        raise BuildError(f"TensorRT wheels for several CUDA majors are installed ({sorted(wheel_majors)}): keep one "
                         f"(`pip uninstall` the others), {INSTALL_FIX}")
    needs = next(iter(wheel_majors))
    major, minor = driver_version // 1000, (driver_version % 1000) // 10
    if needs > major:
        raise BuildError(f"TensorRT {trt_version} is built for CUDA {needs} but this NVIDIA driver supports CUDA up "
                         f"to {major}.{minor}: `pip uninstall -y tensorrt tensorrt-cu{needs} "
                         f"tensorrt-cu{needs}-bindings tensorrt-cu{needs}-libs && pip install "
                         f"'qwen2edge[tensorrt-cu{major}]'`, or upgrade the driver")


def trt_logger(trt: Any) -> Any:
    """The one TensorRT logger of this process, shared by builders and runtimes. ILogger docs (10.x): the
    logger given to an IBuilder/IRuntime "must be valid until all objects created are released"; a
    module-level one outlives every engine and context (TensorRT 7-8.0 even treated it as a singleton)."""
    global _logger
    if _logger is None:
        _logger = trt.Logger(trt.Logger.WARNING)
    return _logger

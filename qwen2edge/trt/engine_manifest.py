"""Engine manifests, the version-dependent build plan and the "is this engine for this device" check.

Pure Python: the TensorRT version and the GPU come in as values, so every rule is tested on CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import BuildError, InferenceError, InputError
from .profiles import Profile

ENGINE_DIR = "engine"
PLAN_FILE = "model.plan"
ENGINE_KIND = "tensorrt-engine"
ENGINE_SCHEMA = 1
MIN_TRT = (10, 3)  # JetPack 6's TensorRT; older releases lack the name-based I/O API used here
PRECISIONS = ("fp32", "fp16", "bf16")
# BuilderFlag member NAMES (never integer values: they were renumbered between 10 and 11).
WEAK_TYPING_FLAG = {"fp16": "FP16", "bf16": "BF16"}


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0, 30); raises InputError on anything else."""
    m = re.match(r"^\s*(\d+(?:\.\d+)*)", str(text))
    if not m:
        raise InputError(f"cannot read a TensorRT version from {text!r}: reinstall TensorRT")
    return tuple(int(x) for x in m.group(1).split("."))


@dataclass(frozen=True)
class GpuInfo:
    """The device an engine is built for / run on."""

    name: str
    compute_capability: str  # "8.7"

    @property
    def sm(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "compute_capability": self.compute_capability}


@dataclass(frozen=True)
class BuildPlan:
    """How to build: strongly typed (precision = the ONNX's types) or weakly typed with builder flags."""

    precision: str
    strongly_typed: bool
    builder_flags: tuple[str, ...] = ()
    cleared_flags: tuple[str, ...] = ()  # BuilderFlag members switched off (TensorRT enables TF32 by default)
    notes: tuple[str, ...] = field(default=())

    @property
    def description(self) -> str:
        off = f"; cleared {list(self.cleared_flags)}" if self.cleared_flags else ""
        if self.strongly_typed:
            return f"strongly typed ({self.precision}, from the ONNX){off}"
        return f"weakly typed, builder flags {list(self.builder_flags)} ({self.precision}){off}"


def plan_build(trt_version: str, onnx_dtype: str, precision: str | None, gpu: GpuInfo | None = None,
               tf32: bool = False) -> BuildPlan:
    """Pick the build path for this TensorRT version.

    TensorRT 11 builds strongly typed networks only (the per-precision builder flags are gone), so the
    precision is the ONNX's: a --precision that differs is refused. TensorRT 10 builds strongly typed
    when the precision matches the ONNX (keeping the exporter's fp32 islands), and otherwise lowers an
    fp32 ONNX with the FP16/BF16 builder flags.

    BuilderFlag.TF32 is "Enabled by default" (10.3 through 11.1 docstrings) and rounds fp32 matmul inputs
    to 10-bit mantissas; an fp32 engine exists to match PyTorch's fp32, so it is cleared unless `tf32`.
    """
    if onnx_dtype not in PRECISIONS:
        raise InputError(f"the bundle's dtype {onnx_dtype!r} is not one of {PRECISIONS}: re-export the bundle")
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"unknown --precision {precision!r}: pass fp32, fp16 or bf16")
    version = parse_version(trt_version)
    if version[:2] < MIN_TRT:
        raise BuildError(f"TensorRT {trt_version} is older than {MIN_TRT[0]}.{MIN_TRT[1]}: install TensorRT 10.3 or "
                         "later (JetPack 6.1+ on Jetson)")
    want = precision or onnx_dtype
    if want == "bf16" and gpu is not None and gpu.sm < (8, 0):
        raise BuildError(f"{gpu.name} (sm_{gpu.compute_capability.replace('.', '')}) has no bf16 support: export "
                         "with --dtype fp16 instead")
    cleared = ("TF32",) if want == "fp32" and not tf32 else ()
    if want == onnx_dtype:
        return BuildPlan(want, strongly_typed=True, cleared_flags=cleared)
    if version[0] >= 11:
        raise InputError(f"TensorRT {trt_version} builds strongly typed networks only, so the precision comes from "
                         f"the ONNX ({onnx_dtype}); --precision {want} does not match it: re-export with "
                         f"`qwen2edge export --dtype {want}` or drop --precision")
    if onnx_dtype != "fp32":
        raise InputError(f"--precision {want} cannot be recovered from a {onnx_dtype} ONNX: re-export with "
                         f"`qwen2edge export --dtype {want}` or drop --precision")
    return BuildPlan(want, strongly_typed=False, builder_flags=(WEAK_TYPING_FLAG[want],),
                     notes=(f"weak typing may run RMSNorm/softmax in {want}; a `--dtype {want}` export builds "
                            "strongly typed with fp32 islands and is the recommended path",))


def engine_manifest(*, trt_version: str, gpu: GpuInfo, plan: BuildPlan, profiles: Sequence[Profile],
                    onnx_file: str, onnx_sha256: str, bundle_dtype: str, limits: Mapping[str, int],
                    workspace_mib: int | None, opt_level: int | None, timing_cache: str | None,
                    build_seconds: float, qwen2edge_version: str) -> dict[str, Any]:
    """The engine/manifest.json body (write_manifest adds the file table with the plan's sha256)."""
    return {
        "schema_version": ENGINE_SCHEMA,
        "kind": ENGINE_KIND,
        "plan_file": PLAN_FILE,
        "tensorrt_version": trt_version,
        "gpu": gpu.to_dict(),
        "precision": plan.precision,
        "bundle_dtype": bundle_dtype,
        "build": {"strongly_typed": plan.strongly_typed, "builder_flags": list(plan.builder_flags),
                  "cleared_flags": list(plan.cleared_flags),
                  "workspace_mib": workspace_mib, "opt_level": opt_level, "timing_cache": timing_cache,
                  "seconds": round(build_seconds, 2), "notes": list(plan.notes)},
        "limits": dict(limits),
        "profiles": [p.to_dict() for p in profiles],
        "source_onnx": {"file": onnx_file, "sha256": onnx_sha256},
        "qwen2edge_version": qwen2edge_version,
    }


def check_engine_matches(manifest: Mapping[str, Any], trt_version: str, gpu: GpuInfo, onnx_sha256: str,
                         engine_dir: str) -> None:
    """Refuse an engine built for another TensorRT, another GPU, or another export of the bundle.

    Plans are not portable across TensorRT versions or GPU architectures (and deserializing one gives
    an opaque error or, worse, a crash), so this check runs before TensorRT sees the plan.
    """
    fix = f"rebuild the engine on this device: qwen2edge build-engine {engine_dir}"
    if manifest.get("kind") != ENGINE_KIND or manifest.get("schema_version") != ENGINE_SCHEMA:
        raise InferenceError(f"{engine_dir}/{ENGINE_DIR}/manifest.json is not a qwen2edge engine manifest "
                             f"(schema {manifest.get('schema_version')}): {fix}")
    built_trt = str(manifest.get("tensorrt_version"))
    built_gpu = manifest.get("gpu") or {}
    problems = []
    if built_trt != str(trt_version):
        problems.append(f"TensorRT {built_trt}, this device has {trt_version}")
    if built_gpu.get("compute_capability") != gpu.compute_capability or built_gpu.get("name") != gpu.name:
        problems.append(f"GPU {built_gpu.get('name')} (sm {built_gpu.get('compute_capability')}), this device has "
                        f"{gpu.name} (sm {gpu.compute_capability})")
    if problems:
        raise InferenceError(f"the engine in {engine_dir} was built for {'; '.join(problems)}: {fix}")
    if (manifest.get("source_onnx") or {}).get("sha256") != onnx_sha256:
        raise InferenceError(f"the engine in {engine_dir} was built from a different model.onnx than the bundle now "
                             f"holds (re-exported since): {fix}")

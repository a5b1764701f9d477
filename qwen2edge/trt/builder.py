"""`qwen2edge build-engine`: bundle/model.onnx -> bundle/engine/{model.plan, manifest.json}.

The orchestration (limits, profiles, build plan, manifest, atomic output) is pure and shared with
the tests; `_trt_build` is the only code here that touches TensorRT, imported lazily.

Why the raw TensorRT API and not Polygraphy's CreateConfig/EngineFromNetwork loaders: the build path
must differ by TensorRT major version (weak typing flags on 10, strong typing only on 11), and the
loaders' precision switches map onto BuilderFlag members that 11 removed; a dozen explicit calls
keep the version logic visible and in plan_build.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..errors import BuildError, InputError
from ..bundle_manifest import BundleManifest
from ..manifest import atomic_directory, prepare_output, write_manifest
from .engine_manifest import ENGINE_DIR, ENGINE_KIND, PLAN_FILE, BuildPlan, engine_manifest, plan_build
from .profiles import Profile, compute_profiles, resolve_limits
from .tensorrt_env import check_cuda_match, import_tensorrt, tensorrt_wheels, trt_logger, wheel_cuda_majors

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EngineOptions:
    """What `qwen2edge build-engine` was asked for."""

    precision: str | None = None  # default: the ONNX's dtype
    max_batch: int = 1
    max_input_len: int | None = None
    max_logits: int | None = None
    workspace_mib: int | None = None
    timing_cache: str | None = None
    opt_level: int | None = None
    tf32: bool = False  # let an fp32 build use TF32 (TensorRT's default; off here, see plan_build)
    overwrite: bool = False  # replace an existing engine directory


def check_options(options: EngineOptions) -> None:
    if options.opt_level is not None and not 0 <= options.opt_level <= 5:
        raise InputError(f"--opt-level {options.opt_level} is outside 0..5: pass 3 (TensorRT's default) or omit it")
    if options.workspace_mib is not None and options.workspace_mib < 1:
        raise InputError(f"--workspace {options.workspace_mib} MiB must be positive: pass e.g. --workspace 1024")


def build_engine(bundle_dir: str | Path, options: EngineOptions = EngineOptions(),
                 progress: Progress = lambda _m: None) -> dict[str, Any]:
    """Build bundle_dir/engine on this device's GPU; returns the engine manifest. Untested on TensorRT."""
    bundle_dir = Path(bundle_dir)
    check_options(options)
    t0 = time.perf_counter()
    progress(f"[1/4] checking {bundle_dir} (checksums) and this device")
    manifest = BundleManifest.read(bundle_dir)
    spec = manifest.io_spec
    limits = resolve_limits(spec, options.max_batch, options.max_input_len, options.max_logits)
    profiles = compute_profiles(spec, limits)
    onnx_path = bundle_dir / manifest.model_file
    # The engine directory is replaced whole: never over another engine without --overwrite, nor over the
    # timing cache (an input).
    inputs = (options.timing_cache,) if options.timing_cache else ()
    prepare_output(bundle_dir / ENGINE_DIR, options.overwrite, inputs, option=None, progress=progress,
                   kind=ENGINE_KIND)
    trt = import_tensorrt()
    from .device import driver_cuda_version, gpu_info

    check_cuda_match(trt.__version__, wheel_cuda_majors(tensorrt_wheels()), driver_cuda_version())
    gpu = gpu_info()
    plan = plan_build(trt.__version__, manifest.dtype, options.precision, gpu, tf32=options.tf32)
    progress(f"      TensorRT {trt.__version__} on {gpu.name} (sm {gpu.compute_capability}); {plan.description}")
    for note in plan.notes:
        progress(f"      note: {note}")
    with atomic_directory(bundle_dir / ENGINE_DIR, options.overwrite, inputs=inputs, option=None,
                          kind=ENGINE_KIND) as tmp:
        serialized, cache_bytes = _trt_build(trt, onnx_path, plan, profiles, options, progress)
        size = write_buffer(tmp / PLAN_FILE, serialized)
        del serialized  # the plan's host copy is the largest allocation left: free it before the manifest
        progress(f"[4/4] wrote {ENGINE_DIR}/{PLAN_FILE} ({size / 2**20:.1f} MiB); writing manifest.json")
        if options.timing_cache and cache_bytes is not None:
            try:
                _write_atomic(Path(options.timing_cache), cache_bytes)
            except OSError as exc:  # the engine is what matters: never lose it over the cache file
                progress(f"      warning: could not write the timing cache {options.timing_cache} ({exc.strerror}); "
                         "the engine is unaffected")
        body = engine_manifest(
            trt_version=trt.__version__, gpu=gpu, plan=plan, profiles=profiles, onnx_file=manifest.model_file,
            onnx_sha256=manifest.model_digest, bundle_dtype=manifest.dtype,
            limits={"max_batch": limits.max_batch, "max_input_len": limits.max_input_len,
                    "max_logits": limits.max_logits},
            workspace_mib=options.workspace_mib, opt_level=options.opt_level, timing_cache=options.timing_cache,
            build_seconds=time.perf_counter() - t0, qwen2edge_version=__version__)
        result = write_manifest(tmp, body)
    progress(f"done in {time.perf_counter() - t0:.0f}s -> {bundle_dir / ENGINE_DIR}")
    return result


def write_buffer(path: Path, buffer: Any) -> int:
    """Write a buffer-protocol object (TensorRT's IHostMemory) without a bytes() copy; returns its size.

    bytes(serialized) would hold the plan twice at the end of a build, which on an 8 GB Orin is the
    difference between finishing and the OOM killer."""
    view = memoryview(buffer)
    with open(path, "wb") as f:
        f.write(view)
    return view.nbytes


def _write_atomic(path: Path, data: bytes) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# TensorRT calls whose failure must not end a build: a binding may raise one of these for a corrupt cache.
_TRT_CALL_ERRORS = (RuntimeError, TypeError, ValueError)


def attach_timing_cache(config: Any, path: Path, progress: Progress) -> Any | None:
    """Load `path`'s timing cache into `config`, or a fresh one; None if TensorRT gives none at all.

    create_timing_cache returns None on failure and set_timing_cache returns False when the cache's
    header (TensorRT version, GPU) does not match this device (ignore_mismatch=False; NVIDIA/TensorRT
    python/docstrings/infer/pyCoreDoc.h, read 2026-12-02). After a JetPack/TensorRT upgrade or with a
    cache from another GPU that is the normal case: warn and start fresh, never fail the build."""

    def attach(data: bytes) -> Any | None:
        try:
            cache = config.create_timing_cache(data)
            return cache if cache is not None and config.set_timing_cache(cache, False) else None
        except _TRT_CALL_ERRORS:
            return None

    data = path.read_bytes() if path.is_file() else b""
    if data:
        cache = attach(data)
        if cache is not None:
            progress(f"      timing cache: {path} ({len(data) / 1024:.0f} KiB)")
            return cache
        progress(f"      warning: timing cache {path} is unreadable or from another TensorRT version or GPU: "
                 "starting a fresh one (the file will be replaced)")
    cache = attach(b"")
    if cache is None:
        progress("      warning: TensorRT could not create a timing cache: building without one "
                 f"({path} is not written)")
    return cache


def timing_cache_bytes(config: Any, progress: Progress) -> bytes | None:
    """The config's timing cache serialized, or None with a warning: runs after a build of minutes, so
    nothing here may raise and lose the engine."""
    try:
        cache = config.get_timing_cache()  # None when no cache is attached
        data = cache.serialize() if cache is not None else None
        if data is not None:
            return bytes(memoryview(data))  # kilobytes to a few MiB: the copy is harmless
    except Exception as exc:  # noqa: BLE001 - any failure here must only cost the cache, never the engine
        progress(f"      warning: could not serialize the timing cache ({type(exc).__name__}: {exc}): not written")
        return None
    progress("      warning: TensorRT returned no timing cache to save: not written")
    return None


def _trt_build(trt: Any, onnx_path: Path, plan: BuildPlan, profiles: list[Profile], options: EngineOptions,
               progress: Progress) -> tuple[Any, bytes | None]:
    """The TensorRT calls (10.x and 11.x Python API, enum members by name); returns (IHostMemory plan,
    timing cache bytes). The builder, network and parser (which holds a copy of the weights) are locals,
    released when this returns, before the plan is written. Untested on TensorRT."""
    from .engine_manifest import parse_version
    from .support_matrix import target_for_version

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and parse_version(trt.__version__)[0] < 11:
        # 11 always builds strongly typed (the flag is deprecated and ignored there).
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    progress(f"[2/4] parsing {onnx_path.name} (external weights resolved beside it)")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0] if errors else "no error reported"
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} errors; first: {first}): run "
                         f"`qwen2edge check {onnx_path.parent} --target {target_for_version(parse_version(trt.__version__))}` "
                         "and report the findings")
    config = builder.create_builder_config()
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    cache = attach_timing_cache(config, Path(options.timing_cache), progress) if options.timing_cache else None
    monitor = _monitor(trt, progress) if hasattr(trt, "IProgressMonitor") else None
    if monitor is not None:
        config.progress_monitor = monitor  # `monitor` stays referenced here until the build returns
    progress(f"[3/4] building ({', '.join(p.name for p in profiles)} profiles; this takes minutes)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT failed to build the engine (see its log above): lower --max-input-len / "
                         "--max-batch, raise --workspace, or add swap on Jetson (docs/jetson.md)")
    cache_bytes = timing_cache_bytes(config, progress) if cache is not None else None
    del monitor  # TensorRT requires the monitor to outlive the build
    return serialized, cache_bytes


def _monitor(trt: Any, progress: Progress) -> Any:
    """An IProgressMonitor that reports top-level build phases (nested phases stay quiet).

    TensorRT may call it from several internal threads, hence the lock."""
    import threading

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.depth: dict[str, int] = {}
            self.lock = threading.Lock()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self.lock:
                depth = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
                self.depth[phase_name] = depth
            if depth <= 1:
                progress(f"      {'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            with self.lock:
                self.depth.pop(phase_name, None)

    return Monitor()

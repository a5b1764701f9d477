"""`qwen2edge triton-repo`: a Triton model repository serving one bundle through the Python backend.

    REPO/manifest.json          what was written, from which bundle, with checksums
    REPO/NAME/config.pbtxt      Python backend, decoupled, N instances, qwen2edge parameters
    REPO/NAME/1/model.py        a copy of qwen2edge/triton/model.py
    REPO/NAME/1/bundle/         the bundle itself, with --copy-bundle (else the config names its path)

The repository is written atomically (manifest.atomic_directory): into a new or empty directory, or
over a repository this command wrote with --overwrite, never over anything else or the bundle.
"""

from __future__ import annotations

import os
import re
import shutil
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import InputError
from ..manifest import MANIFEST, atomic_directory, prepare_output, read_manifest, write_manifest
from ..runtime.bundle import Bundle
from ..trt.engine_manifest import ENGINE_DIR
from .config import ModelSettings, render_config

REPO_KIND = "qwen2edge-triton-repo"
VERSION = "1"
MODEL_FILE = "model.py"
BUNDLE_COPY = "bundle"
DEFAULT_MAX_BATCH = 8  # ONNX Runtime, as `qwen2edge serve`
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RepoOptions:
    """What `qwen2edge triton-repo` was told (the per-instance settings live in ModelSettings)."""

    name: str = "qwen2edge"
    instances: int = 1
    backend: str = "ort"
    max_batch: int | None = None  # default: 8 for ONNX Runtime, the engine's max batch for TensorRT
    threads: int = 0
    streaming: bool = True
    python_path: str | None = None  # default: default_python_path()
    copy_bundle: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InputError(f"{{opt:name}} {self.name!r} is not a valid Triton model name: use letters, digits, "
                             "'_', '-' and '.', e.g. qwen2edge")
        if self.instances < 1:
            raise InputError(f"{{opt:instances}} must be at least 1, got {self.instances}: e.g. 2")


def default_python_path() -> str:
    """Where this qwen2edge and its dependencies are importable from: the directory holding the qwen2edge
    package (a checkout on PYTHONPATH, or site-packages), then this environment's site-packages."""
    import qwen2edge

    paths = [str(Path(qwen2edge.__file__).resolve().parent.parent)]
    paths += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return os.pathsep.join(dict.fromkeys(paths))


def write_triton_repo(bundle_dir: str | Path, out_dir: str | Path, options: RepoOptions = RepoOptions(),
                      progress: Progress = lambda _msg: None, overwrite: bool = False) -> Path:
    """Write the model repository for `bundle_dir` to `out_dir`; returns the model's directory."""
    out = Path(out_dir)
    progress(f"[1/3] checking {bundle_dir} (checksums)")
    bundle = Bundle.open(bundle_dir)  # refuses a bundle that fails its manifest
    max_batch = _max_batch(bundle, options)
    prepare_output(out, overwrite, inputs=(bundle_dir,), progress=progress, kind=REPO_KIND)
    settings = ModelSettings(bundle=BUNDLE_COPY if options.copy_bundle else str(bundle.path.resolve()),
                             backend=options.backend, max_batch=max_batch, threads=options.threads,
                             streaming=options.streaming)
    python_path = default_python_path() if options.python_path is None else options.python_path
    with atomic_directory(out, overwrite, inputs=(bundle_dir,), kind=REPO_KIND) as tmp:
        version_dir = tmp / options.name / VERSION
        version_dir.mkdir(parents=True)
        (tmp / options.name / "config.pbtxt").write_text(
            render_config(options.name, settings, options.instances, python_path), encoding="utf-8")
        shutil.copyfile(Path(__file__).with_name(MODEL_FILE), version_dir / MODEL_FILE)
        if options.copy_bundle:
            progress(f"[2/3] copying the bundle into {options.name}/{VERSION}/{BUNDLE_COPY}")
            _copy_bundle(bundle, version_dir / BUNDLE_COPY, with_engine=options.backend == "trt")
        else:
            progress("[2/3] referring to the bundle in place (--copy-bundle copies it into the repository)")
        progress("[3/3] writing the repository manifest")
        write_manifest(tmp, {"kind": REPO_KIND, "qwen2edge_version": __version__, "model_name": options.name,
                             "source_bundle": str(bundle.path.resolve()),
                             "options": {**asdict(options), "max_batch": max_batch, "python_path": python_path}})
    progress(f"done -> {out}/{options.name}")
    return out / options.name


def _max_batch(bundle: Bundle, options: RepoOptions) -> int:
    if options.backend != "trt":
        return DEFAULT_MAX_BATCH if options.max_batch is None else options.max_batch
    engine = bundle.path / ENGINE_DIR
    if not (engine / MANIFEST).is_file():
        raise InputError(f"{{opt:backend}} trt needs a TensorRT engine in {engine}: run `qwen2edge build-engine "
                         f"{bundle.path}` on the serving GPU first")
    engine_max = int(read_manifest(engine, verify=False).get("limits", {}).get("max_batch", 1))
    if options.max_batch is not None and options.max_batch > engine_max:
        raise InputError(f"{{opt:max_batch}} {options.max_batch} exceeds the engine's max batch {engine_max}: use "
                         f"{engine_max} or rebuild the engine with a larger {{opt:max_batch}}")
    return engine_max if options.max_batch is None else options.max_batch


def _copy_bundle(bundle: Bundle, dest: Path, with_engine: bool) -> None:
    """The bundle's listed files and manifest (its engine too, for TensorRT), re-verified after the copy."""
    names = [*bundle.manifest.files, MANIFEST]
    if with_engine:
        engine = bundle.path / ENGINE_DIR
        names += [p.relative_to(bundle.path).as_posix() for p in sorted(engine.rglob("*")) if p.is_file()]
    for rel in dict.fromkeys(names):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle.path / rel, target)
    read_manifest(dest)
    if with_engine:
        read_manifest(dest / ENGINE_DIR)

"""`qwen2edge bundle` / `unbundle`: one .tar.gz carrying an export to a device (e.g. a Jetson).

The archive holds the bundle's files (model, tokenizer, manifest.json), a torch-free requirements
file, a short device README, a pure-Python wheel of this qwen2edge (so the device needs only PyPI
for the dependencies), and PACKAGE.json with the sha256 of every member. Unpacking validates every
member name before writing anything (no absolute paths, no `..`, no links or devices), streams
each file while hashing it, and then re-verifies the bundle's own manifest; output is atomic.
Engines (bundle/engine) are never packed: they are built on the device they run on.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import tempfile
import re
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from . import __version__
from .bundle_manifest import BUNDLE_KIND, BundleManifest
from .errors import BundleError, InputError
from .manifest import MANIFEST, PACKAGE, atomic_directory, check_entry, is_confined, sha256_file

PACKAGE_KIND = "qwen2edge-device-bundle"
REQUIREMENTS = "requirements-device.txt"
README = "README-device.md"
# The core (torch-free) runtime dependencies: must equal pyproject's [project].dependencies (tested).
RUNTIME_REQUIREMENTS = ("numpy>=1.24", "onnxruntime>=1.18", "tokenizers>=0.19", "jinja2>=3.1", "click>=8.1")
# = pyproject's `tensorrt` extra (tested); TensorRT itself comes from JetPack or a tensorrt-cu12/-cu13 extra.
TENSORRT_REQUIREMENTS = ("polygraphy>=0.53.4",)
_CHUNK = 1 << 20
_WHEEL = re.compile(r"wheels/qwen2edge-[^/]+-py3-none-any\.whl")  # any qwen2edge version's runtime wheel

Progress = Callable[[str], None]


def wheel_name() -> str:
    return f"qwen2edge-{__version__}-py3-none-any.whl"


def build_wheel(dest: Path) -> Path:
    """A pure-Python wheel of the installed/imported qwen2edge package (deterministic timestamps)."""
    pkg = Path(__file__).resolve().parent
    dist = f"qwen2edge-{__version__}.dist-info"
    files: list[tuple[str, bytes]] = []
    for p in sorted(pkg.rglob("*.py")):
        if "__pycache__" not in p.parts:
            files.append((f"qwen2edge/{p.relative_to(pkg).as_posix()}", p.read_bytes()))
    meta = ["Metadata-Version: 2.1", "Name: qwen2edge", f"Version: {__version__}",
            "Summary: qwen2edge edge runtime (packed by `qwen2edge bundle`)", "Requires-Python: >=3.10",
            *[f"Requires-Dist: {r}" for r in RUNTIME_REQUIREMENTS], "Provides-Extra: tensorrt",
            *[f'Requires-Dist: {r}; extra == "tensorrt"' for r in TENSORRT_REQUIREMENTS]]
    files += [(f"{dist}/METADATA", ("\n".join(meta) + "\n").encode()),
              (f"{dist}/WHEEL", b"Wheel-Version: 1.0\nGenerator: qwen2edge\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
              (f"{dist}/entry_points.txt", b"[console_scripts]\nqwen2edge = qwen2edge.cli:main\n")]
    record = []
    for name, data in files:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files.append((f"{dist}/RECORD", ("\n".join(record) + "\n").encode()))
    out = dest / wheel_name()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data, zipfile.ZIP_DEFLATED)
    return out


def requirements_text() -> str:
    lines = ["# qwen2edge device runtime: no torch, no transformers.",
             "# pip install -r requirements-device.txt && pip install --no-deps wheels/" + wheel_name(),
             "# TensorRT itself: JetPack's python3-libnvinfer on Jetson (venv with --system-site-packages),",
             "# or `pip install tensorrt-cu12` / `tensorrt-cu13` (the driver's CUDA major) on x86-64;",
             "# see README-device.md.",
             *RUNTIME_REQUIREMENTS, *TENSORRT_REQUIREMENTS]
    return "\n".join(lines) + "\n"


def readme_text(manifest: BundleManifest) -> str:
    cfg = manifest.model_config
    return f"""# qwen2edge device bundle

Model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, exported as
{manifest.dtype} with max_seq_len {manifest.max_seq_len} (opset {manifest.opset}).

On the device (Jetson: JetPack 6.1+ or 7.x, see docs/jetson.md in the qwen2edge repository):

```
tar -xzf THIS_FILE.tar.gz requirements-device.txt wheels   # bootstrap: just what installs the runtime
python3 -m venv --system-site-packages ~/q2e && . ~/q2e/bin/activate   # sees JetPack's tensorrt
pip install -r requirements-device.txt
pip install --no-deps wheels/{wheel_name()}
qwen2edge unbundle THIS_FILE.tar.gz -o model        # verifies every checksum, refuses unsafe paths
qwen2edge plan-memory model --max-batch 1           # will it fit?
qwen2edge build-engine model --max-batch 1          # minutes; builds model/engine for THIS device
qwen2edge generate model --backend trt --prompt "Hello" --chat
```

`--backend ort` runs the same bundle on ONNX Runtime (CPU) without an engine.
The TensorRT path has not been run by the qwen2edge authors on any device yet: please report results.
"""


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_bundle(bundle_dir: str | Path, out_file: str | Path, progress: Progress = lambda _m: None,
                overwrite: bool = False) -> dict[str, Any]:
    """Pack an export directory into a device .tar.gz (atomic); returns PACKAGE.json's body. Only the files
    the bundle's manifest lists are packed, and it lists only paths inside the bundle (BundleManifest)."""
    bundle_dir, out_file = Path(bundle_dir), Path(out_file)
    if not str(out_file).endswith((".tar.gz", ".tgz")):
        raise InputError(f"{out_file} should end in .tar.gz: pass e.g. -o model.tar.gz")
    if out_file.exists() and not overwrite:
        raise InputError(f"{out_file} already exists: pass {{opt:overwrite}} to replace it, or another {{opt:output}}")
    progress(f"[1/3] verifying {bundle_dir} against its manifest")
    manifest = BundleManifest.read(bundle_dir)
    members: dict[str, Path | bytes] = {MANIFEST: bundle_dir / MANIFEST}
    for rel in manifest.files:
        members[rel] = bundle_dir / rel
    with tempfile.TemporaryDirectory() as td:
        members[f"wheels/{wheel_name()}"] = build_wheel(Path(td)).read_bytes()
        members[REQUIREMENTS] = requirements_text().encode()
        members[README] = readme_text(manifest).encode()
        table = {}
        for rel, src in members.items():
            if isinstance(src, bytes):
                table[rel] = {"sha256": _sha256_bytes(src), "bytes": len(src)}
            else:
                table[rel] = {"sha256": sha256_file(src), "bytes": src.stat().st_size}
        package = {"kind": PACKAGE_KIND, "qwen2edge_version": __version__, "created": int(time.time()),
                   "files": table}
        out_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out_file.name}.", suffix=".partial", dir=out_file.parent)
        os.close(fd)
        try:
            progress(f"[2/3] packing {len(members)} files")
            with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:  # weights barely compress; level 9 is minutes
                _add_bytes(tar, PACKAGE, json.dumps(package, indent=2).encode())  # first: read before the rest
                for rel, src in members.items():
                    if isinstance(src, bytes):
                        _add_bytes(tar, rel, src)
                    else:
                        info = tar.gettarinfo(str(src), arcname=rel)
                        info.uid = info.gid = 0
                        info.uname = info.gname = ""
                        info.mode = 0o644
                        with open(src, "rb") as f:
                            tar.addfile(info, f)
            os.replace(tmp, out_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    progress(f"[3/3] wrote {out_file} ({out_file.stat().st_size / 2**20:.1f} MiB)")
    return package


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def safe_member_path(name: str) -> PurePosixPath:
    """The member's relative path, or BundleError if it could escape the output directory."""
    if not is_confined(name.rstrip("/") if name.endswith("/") and len(name) > 1 else name):
        raise BundleError(f"archive member {name!r} has an unsafe name or points outside the output directory: "
                          "refusing to unpack; re-create the archive with `qwen2edge bundle`")
    return PurePosixPath(name)


def unpack_bundle(archive: str | Path, out_dir: str | Path, progress: Progress = lambda _m: None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Verify and unpack a device bundle into out_dir (atomic); returns PACKAGE.json's body. Every member
    must be one of the bundle's manifest-listed files or the packaging files `pack_bundle` adds."""
    archive, out_dir = Path(archive), Path(out_dir)
    if not archive.is_file():
        raise InputError(f"{archive} does not exist: pass a file written by `qwen2edge bundle`")
    try:
        tar = tarfile.open(archive, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{archive} is not a .tar.gz written by `qwen2edge bundle` ({_first_line(exc)}): re-copy "
                          "it or re-run `qwen2edge bundle`") from None
    with tar:
        progress(f"[1/3] checking member names in {archive}")
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise BundleError(f"{archive} is truncated or corrupt ({_first_line(exc)}): re-copy it") from None
        names: set[str] = set()
        for m in members:
            rel = safe_member_path(m.name)
            if not (m.isfile() or m.isdir()):
                raise BundleError(f"archive member {m.name!r} is a link or special file: refusing to unpack; "
                                  "re-create the archive with `qwen2edge bundle`")
            if m.isfile():
                key = rel.as_posix()
                if key in names:
                    raise BundleError(f"archive member {m.name!r} appears twice: refusing to unpack")
                names.add(key)
        if PACKAGE not in names:
            raise BundleError(f"{archive} has no {PACKAGE}: it was not written by `qwen2edge bundle`")
        package = _read_json_member(tar, PACKAGE, archive)
        listed = package.get("files")
        if not isinstance(listed, dict):
            raise BundleError(f"{archive}'s {PACKAGE} lists no files: re-run `qwen2edge bundle`")
        for rel, meta in listed.items():
            check_entry(rel, meta, f"{archive}'s {PACKAGE}")
        extra = sorted(names - set(listed) - {PACKAGE})
        if extra:
            raise BundleError(f"{archive} holds {extra[0]!r}, which {PACKAGE} does not list: refusing to unpack")
        missing = sorted(set(listed) - names)
        if missing:
            raise BundleError(f"{archive} lacks {missing[0]!r} listed in {PACKAGE}: re-copy it or re-run "
                              "`qwen2edge bundle`")
        if MANIFEST not in names:
            raise BundleError(f"{archive} has no {MANIFEST}: it was not written by `qwen2edge bundle`")
        # PACKAGE.json comes from the archive too: only the bundle's own manifest decides what may land
        # beside the model (an unlisted member could be a planted .ort-cache graph, run unverified).
        manifest = BundleManifest.from_dict(_read_json_member(tar, MANIFEST, archive), f"{archive}'s {MANIFEST}")
        stray = sorted(n for n in names - set(manifest.files) - {PACKAGE, MANIFEST, REQUIREMENTS, README}
                       if not _WHEEL.fullmatch(n))
        if stray:
            raise BundleError(f"{archive} holds {stray[0]!r}, which the bundle's {MANIFEST} does not list: refusing "
                              "to unpack; re-create the archive with `qwen2edge bundle`")
        progress(f"[2/3] extracting {len(listed)} files with checksums")
        with atomic_directory(out_dir, overwrite, inputs=(archive,), progress=progress, kind=BUNDLE_KIND) as tmp:
            for m in members:
                key = safe_member_path(m.name).as_posix()
                if not m.isfile() or key == PACKAGE:
                    continue
                dest = tmp / key
                dest.parent.mkdir(parents=True, exist_ok=True)
                h, size = hashlib.sha256(), 0
                src = tar.extractfile(m)
                with open(dest, "wb") as f:
                    for block in iter(lambda: src.read(_CHUNK), b""):  # type: ignore[union-attr]
                        h.update(block)
                        size += len(block)
                        f.write(block)
                meta = listed[key]
                if h.hexdigest() != meta["sha256"] or size != meta["bytes"]:
                    raise BundleError(f"{key} in {archive} fails its checksum (corrupted in transfer): re-copy the "
                                      "archive")
            (tmp / PACKAGE).write_bytes(json.dumps(package, indent=2).encode())
            progress("[3/3] verifying the bundle manifest")
            BundleManifest.read(tmp)
    progress(f"done -> {out_dir}")
    return package


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_json_member(tar: tarfile.TarFile, name: str, archive: Path) -> dict[str, Any]:
    try:
        data = json.loads(tar.extractfile(name).read())  # type: ignore[union-attr]
    except (ValueError, tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BundleError(f"{name} in {archive} is unreadable ({_first_line(exc)}): re-copy it or re-run "
                          "`qwen2edge bundle`") from None
    if not isinstance(data, dict):
        raise BundleError(f"{name} in {archive} does not hold a JSON object: re-run `qwen2edge bundle`")
    return data

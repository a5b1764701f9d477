"""manifest.json files on disk: checksums, atomic JSON writes and atomic artifact directories (torch-free).

The bundle manifest's typed form is `bundle_manifest.BundleManifest`; this module only moves bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import BundleError, InputError

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} for every regular file under root."""
    table = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            table[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return table


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temp file in the same directory, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_manifest(root: str | Path, data: dict[str, Any]) -> dict[str, Any]:
    """Add the file table to `data` and write root/manifest.json."""
    root = Path(root)
    data = dict(data)
    data["files"] = file_table(root)
    write_json_atomic(root / MANIFEST, data)
    return data


def read_manifest(root: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read root/manifest.json and (by default) check every listed file's size and sha256."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a directory: pass a bundle written by `qwen2edge export`")
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} is missing: re-run `qwen2edge export` to write a complete bundle")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}): re-run `qwen2edge export`") from None
    if verify:
        verify_files(root, manifest.get("files", {}))
    return manifest


def verify_files(root: Path, files: dict[str, dict[str, Any]]) -> None:
    """Raise BundleError naming the first file that is missing or fails its checksum."""
    for rel, meta in files.items():
        p = root / rel
        if not p.is_file():
            raise BundleError(f"{p} is listed in the manifest but missing: re-run the export or re-copy the bundle")
        if p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            raise BundleError(
                f"{p} fails its manifest checksum (corrupted or modified): re-run the export or re-copy the bundle"
            )


@contextlib.contextmanager
def atomic_directory(final: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success it replaces `final`, on any error or interrupt
    it is removed, so no half-written artifact directory is ever left under the final name."""
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        raise InputError(f"{final} exists and is not a directory: choose another output path")
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise InputError(f"{final} already exists: pass --overwrite or choose another output path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""manifest.json files on disk: checksums, atomic JSON writes, and atomic artifact directories with the
rules for where they may be written (torch-free).

The bundle manifest's typed form is `bundle_manifest.BundleManifest`; this module only moves bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping

from .errors import BundleError, InputError

MANIFEST = "manifest.json"
PACKAGE = "PACKAGE.json"  # a device bundle's table of the archive members (device_bundle.py)
# Files whose "files" table names what qwen2edge wrote beside them.
LISTINGS = (MANIFEST, PACKAGE)
# Directories qwen2edge (or Python) writes at run time beside an artifact's files, never listed.
RUNTIME_DIRS = (".ort-cache", "__pycache__")
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def is_confined(rel: str) -> bool:
    """Whether `rel` is a plain relative POSIX path that stays inside the directory it is relative to
    (no absolute path, `..`, drive, backslash or NUL)."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return False
    p = PurePosixPath(rel)
    return not (p.is_absolute() or ".." in p.parts or p.parts[0].endswith(":") or rel.endswith("/"))


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
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} does not hold a JSON object: re-run `qwen2edge export`")
    if verify:
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise BundleError(f"{path} lists no files, so nothing in {root} can be verified: re-run the command "
                              "that wrote it")
        verify_files(root, files, where=str(path))
    return manifest


def check_entry(rel: Any, meta: Any, where: str = MANIFEST) -> tuple[str, int]:
    """(sha256, bytes) of one `files` entry; BundleError for a path outside the directory or a malformed
    entry (a manifest is only as good as each of its entries)."""
    if not is_confined(rel):
        raise BundleError(f"{where} lists {rel!r}, a path outside its directory: refusing it; re-create the "
                          "artifact with qwen2edge")
    sha, size = (meta.get("sha256"), meta.get("bytes")) if isinstance(meta, Mapping) else (None, None)
    if not isinstance(sha, str) or not _SHA256.match(sha) or type(size) is not int or size < 0:
        raise BundleError(f"{where} has a malformed entry for {rel!r} (it needs a hex 'sha256' and an integer "
                          "'bytes'): re-create the artifact with qwen2edge")
    return sha, size


def verify_files(root: Path, files: Mapping[str, Any], where: str = MANIFEST) -> None:
    """Raise BundleError naming the first file that is missing, malformed in the table or fails its checksum."""
    for rel, meta in files.items():
        sha, size = check_entry(rel, meta, where)
        p = root / rel
        if not p.is_file():
            raise BundleError(f"{p} is listed in the manifest but missing: re-run the export or re-copy the bundle")
        if p.stat().st_size != size or sha256_file(p) != sha:
            raise BundleError(
                f"{p} fails its manifest checksum (corrupted or modified): re-run the export or re-copy the bundle"
            )


# ---- artifact directories: where they may go, how they are replaced -----------------------------

def _listed(listing: Path) -> list[str] | None:
    """The paths a manifest.json / PACKAGE.json names; None when it is not one of ours (no files table)."""
    try:
        files = json.loads(listing.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return [rel for rel in files if is_confined(rel)] if isinstance(files, dict) else None


def first_foreign(root: Path) -> str | None:
    """The first path under `root` that qwen2edge did not write (None for an untouched artifact): every
    file must be a listing (manifest.json, PACKAGE.json) or named by one in the same or a parent directory,
    or lie in a run-time directory such as .ort-cache."""
    if not (root / MANIFEST).is_file():  # not an artifact at all: name its first entry, without a deep scan
        first = min(root.iterdir(), default=None)
        return first.name if first is not None else None
    entries = sorted(root.rglob("*"))  # rglob does not follow symlinked directories
    ours: set[str] = set()
    for p in entries:
        listed = _listed(p) if p.name in LISTINGS and p.is_file() and not p.is_symlink() else None
        if listed is not None:
            base = p.parent.relative_to(root)
            ours.update((base / rel).as_posix() for rel in (p.name, *listed))
    for p in entries:
        rel = p.relative_to(root)
        if set(rel.parts) & set(RUNTIME_DIRS) or (p.is_dir() and not p.is_symlink()):
            continue
        if rel.as_posix() not in ours:
            return rel.as_posix()
    return None


def check_output(final: Path, overwrite: bool = False, inputs: Iterable[str | Path] = (),
                 option: str | None = "output", kind: str | None = None) -> None:
    """Refuse an output directory that is (or contains) an input, holds anything qwen2edge did not write,
    holds another kind of artifact than `kind` (the manifest's "kind"), or holds an artifact when
    `overwrite` is off. `option` names the output's option in messages."""
    other = f"pass another {{opt:{option}}}" if option else f"remove {final} yourself first"
    resolved = final.resolve()
    for given in inputs:
        src = Path(given).resolve()
        if src == resolved or resolved in src.parents:
            relation = "is" if src == resolved else "contains"
            raise InputError(f"the output {final} {relation} the input {given}, which writing it would delete: "
                             + (other if option else "keep that input elsewhere"))
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise InputError(f"{final} is a file or a symbolic link, not a directory: {other}")
    if not final.exists() or not any(final.iterdir()):
        return
    foreign = first_foreign(final)
    if foreign is not None:
        raise InputError(f"{final} holds {foreign}, which no qwen2edge manifest there lists, so the directory is "
                         f"never replaced: move that out, or {other}")
    if kind is not None:
        found = json.loads((final / MANIFEST).read_text(encoding="utf-8")).get("kind")  # parsed by first_foreign
        if found != kind:
            raise InputError(f"{final} holds a qwen2edge {found or 'artifact'} output, not a {kind}, so this command "
                             f"never replaces it: {other}")
    if not overwrite:
        raise InputError(f"{final} already holds a qwen2edge artifact: pass {{opt:overwrite}} to replace it"
                         + (f", or another {{opt:{option}}}" if option else ""))


def pid_alive(pid: int) -> bool:
    """Whether process `pid` (this one included) still runs: leftovers of live runs are never touched."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def recover_interrupted(final: Path) -> list[str]:
    """Undo what a killed run left beside `final`: restore the previous artifact if the kill fell between
    the two renames of a replace, and remove half-written directories. Leftovers of live processes stay.
    Returns what was done, for the progress log."""
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)\.(?:\w+\.)?(partial|old)")
    found = [(m.group(2), p) for p in final.parent.iterdir()
             if (m := pattern.fullmatch(p.name)) and not pid_alive(int(m.group(1)))]
    done = []
    for what, p in sorted(found, key=lambda kp: kp[0] != "old"):  # restore before removing
        if what == "old" and not final.exists() and not final.is_symlink():
            os.replace(p, final)
            done.append(f"restored {final} from an interrupted replace")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}, left by an interrupted run")
    return done


def prepare_output(final: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = (),
                   option: str | None = "output", progress: Any = None, kind: str | None = None) -> Path:
    """Make `final`'s parent, clean up after a killed run there (recover_interrupted), and check_output;
    returns `final` made absolute. Commands call it before slow work; atomic_directory calls it too."""
    final = Path(final).absolute()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for line in recover_interrupted(final):
            if progress is not None:
                progress(line)
    except OSError as exc:
        raise InputError(f"cannot write to {final.parent} ({exc.strerror}): pass an output path you can write") from None
    check_output(final, overwrite, inputs, option, kind)
    return final


@contextlib.contextmanager
def atomic_directory(final: str | Path, overwrite: bool = False, *, inputs: Iterable[str | Path] = (),
                     option: str | None = "output", progress: Any = None, kind: str | None = None) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success it replaces `final`, on any error or interrupt
    it is removed, so no half-written artifact directory is ever left under the final name.

    `final` must pass check_output (never an input, never foreign files, an artifact of `kind` only with
    `overwrite`); what a killed run left beside it is cleaned up first (prepare_output)."""
    inputs = tuple(inputs)
    final = prepare_output(final, overwrite, inputs, option, progress, kind)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
    except OSError as exc:
        raise InputError(f"cannot write to {final.parent} ({exc.strerror}): pass an output path you can write") from None
    try:
        yield tmp
        check_output(final, overwrite, inputs, option, kind)  # again: minutes may have passed
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.{os.getpid()}.old")
            os.replace(final, old)
        # A kill here leaves `old` and a complete `tmp`: recover_interrupted restores `old` next time.
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""The optimized-graph cache beside a bundle (`.ort-cache`), and why a cache may be loaded (torch-free).

ONNX Runtime's optimizer runs once per model, ONNX Runtime version and CPU architecture; its output is
saved under ORT_CACHE and loaded instead of the model afterwards. The cache is not part of the bundle's
manifest, so it could be swapped without the bundle failing its checksums: each cache directory holds a
record (CACHE_RECORD) of the model digest it was optimized from and the checksums of its files, signed
with a key of this machine's user (signing_key). A cache is loaded only when its record verifies, names
the verified model and matches every file; anything else is rebuilt. A cache copied in with a bundle
(rsync, an archive) was signed elsewhere, so it is rebuilt too.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import BundleError
from ..manifest import file_table, pid_alive, verify_files, write_json_atomic

ORT_CACHE = ".ort-cache"  # optimized graphs, beside the bundle's files (not in its manifest)
OPTIMIZED_FILE = "model.optimized.onnx"
CACHE_RECORD = "cache.json"  # written last: {model_digest, files, signature}
KEY_FILE = "cache-signing.key"
_PARTIAL = re.compile(r"\.partial-(\d+)-\w+")  # a cache being written by process N


def optimized_cache_dir(root: Path, model_sha256: str) -> Path:
    """Where the optimized graph for this model, ONNX Runtime version and CPU architecture lives.
    Optimized graphs can hold hardware-specific kernels, hence the architecture in the key."""
    import onnxruntime as ort

    return Path(root) / f"{model_sha256[:16]}-ort{ort.__version__}-{platform.machine()}"


@functools.lru_cache(maxsize=None)
def signing_key(root: str | None = None) -> bytes | None:
    """This user's secret for cache records: $QWEN2EDGE_CACHE (else ~/.cache/qwen2edge)/cache-signing.key,
    32 random bytes made once with mode 0600; None when it cannot be stored (then nothing is cached)."""
    base = Path(root or os.environ.get("QWEN2EDGE_CACHE") or Path.home() / ".cache" / "qwen2edge").expanduser()
    path = base / KEY_FILE
    try:
        if not path.is_file():
            base.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=base)  # 0600
            try:
                os.write(fd, os.urandom(32))
                os.close(fd)
                os.link(tmp, path)  # atomic and never over a key another process made first
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        key = path.read_bytes()
    except OSError:
        return None
    return key if len(key) == 32 else None


def _signature(key: bytes, directory: Path, model_digest: str, files: Any) -> str:
    # The directory's name (model digest, ONNX Runtime version, architecture) is signed too: a record
    # cannot be moved to another version's or machine's directory.
    body = json.dumps({"dir": directory.name, "model_digest": model_digest, "files": files}, sort_keys=True)
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def cache_problem(directory: Path, model_digest: str) -> str | None:
    """Why the cache in `directory` must not be loaded for the model with `model_digest`; None if it may."""
    key = signing_key()
    if key is None:
        return "no signing key could be stored"
    try:
        record = json.loads((directory / CACHE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"no readable {CACHE_RECORD} ({type(exc).__name__})"
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return f"{CACHE_RECORD} is malformed"
    files, signature = record["files"], str(record.get("signature", ""))
    if not hmac.compare_digest(signature, _signature(key, directory, str(record.get("model_digest")), files)):
        return f"{CACHE_RECORD} was not written here (its signature does not verify)"
    if not model_digest or record.get("model_digest") != model_digest:
        return "it was optimized from another model"
    if OPTIMIZED_FILE not in files:
        return f"{CACHE_RECORD} lists no optimized graph"
    try:
        verify_files(directory, files, str(directory / CACHE_RECORD))
        unlisted = sorted({p.name for p in directory.iterdir()} - set(files) - {CACHE_RECORD})
    except (BundleError, OSError) as exc:
        return str(exc)
    return f"it holds {unlisted[0]}, which {CACHE_RECORD} does not list" if unlisted else None


def new_cache_dir(final: Path) -> Path | None:
    """A temp directory to write `final`'s cache into (partials of killed processes are removed first);
    None when nothing can be cached (read-only bundle, no signing key)."""
    root = final.parent
    if signing_key() is None:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        for p in root.iterdir():
            m = _PARTIAL.fullmatch(p.name)
            if m and not pid_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f".partial-{os.getpid()}-", dir=root))
    except OSError:
        return None


def publish(tmp: Path, final: Path, model_digest: str) -> bool:
    """Sign and record the fresh cache in `tmp` and rename it to `final`, or drop it (atomic either way);
    whether it was published."""
    key = signing_key()
    try:
        if key is not None and (tmp / OPTIMIZED_FILE).is_file():
            files = file_table(tmp, exclude=(CACHE_RECORD,))
            write_json_atomic(tmp / CACHE_RECORD, {"model_digest": model_digest, "files": files,
                                                   "signature": _signature(key, final, model_digest, files)})
            os.replace(tmp, final)
            return True
    except OSError:
        pass  # another process published first, or the disk is read-only/full
    shutil.rmtree(tmp, ignore_errors=True)
    return False

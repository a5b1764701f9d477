"""A local tritonserver without Docker: the binary NVIDIA ships inside the nvidia-pytriton wheel.

For development, CI and benchmarks on x86-64 Linux (CPU is enough; NVML/DCGM warnings are harmless).
The wheel is downloaded with pip (no install: pytriton's own Python package pins numpy<2), unpacked,
and the Python backend stub matching the running Python is put where the backend looks for it.
Production runs Triton's NGC container instead (docs/triton.md).

The stub embeds the first `python3` on PATH, with that environment's packages, and imports numpy
before model.py runs. Triton 2.51's stub is built with pybind11 2.10, which reads numpy 2 arrays
wrongly (its first request kills it), so the stub gets a venv of its own holding numpy<2 (STUB_NUMPY);
model.py then adds the environment that has qwen2edge (its python_path) behind the numpy already loaded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from ..errors import InferenceError
from ..manifest import atomic_directory

PYTRITON = "nvidia-pytriton==0.7.0"  # carries Triton 2.51 (24.10)
STUB_NUMPY = "numpy<2"  # Triton <= 24.10 stubs (pybind11 < 2.12) predate numpy 2
_UNPACKED = "tritonserver-{version}-py{major}.{minor}"


class TritonUnavailable(InferenceError):
    """The tritonserver binary could not be prepared or started."""


class DownloadFailed(TritonUnavailable):
    """pip could not download the wheel (or the stub's numpy): no network, no index, no such version."""


def fetch_wheel(cache_dir: str | Path, requirement: str = PYTRITON, timeout: float = 600) -> Path:
    """The nvidia-pytriton wheel in `cache_dir`, downloaded with pip (no dependencies) unless already there."""
    cache_dir = Path(cache_dir)
    version = requirement.split("==")[-1]
    pattern = f"nvidia_pytriton-{version}-*.whl"
    found = sorted(cache_dir.glob(pattern))
    if found:
        return found[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", requirement,
           "-d", str(cache_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DownloadFailed(f"`pip download {requirement}` failed ({exc}): check the network or put the "
                             f"wheel in {cache_dir}") from None
    found = sorted(cache_dir.glob(pattern))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise DownloadFailed(f"`pip download {requirement}` failed ({last}): check the network or put the "
                             f"wheel in {cache_dir}")
    return found[0]


class TritonInstall:
    """An unpacked wheel: the tritonserver binary, its libraries and a Python backend for this Python."""

    def __init__(self, root: Path):
        self.root = root
        self.server_dir = root / "pytriton" / "tritonserver"
        self.binary = self.server_dir / "bin" / "tritonserver"
        self.backend_dir = self.server_dir / "backends"
        self.lib_dir = root / "nvidia_pytriton.libs"
        self.stub_python = root / "stub-python"  # the venv the backend stub embeds

    @classmethod
    def prepare(cls, cache_dir: str | Path, requirement: str = PYTRITON) -> "TritonInstall":
        """Fetch (if needed) and unpack the wheel under `cache_dir`, once per wheel version and Python."""
        cache_dir = Path(cache_dir).resolve()
        version = requirement.split("==")[-1]
        root = cache_dir / _UNPACKED.format(version=version, major=sys.version_info[0], minor=sys.version_info[1])
        if not (root / ".complete").is_file():
            wheel = fetch_wheel(cache_dir, requirement)
            with atomic_directory(root) as tmp:
                _unpack(wheel, tmp)
                _stub_venv(tmp / "stub-python")
                (tmp / ".complete").write_text("ok\n")
        return cls(root)

    def env(self) -> dict[str, str]:
        """The environment tritonserver needs: its bundled libraries, and this Python's libpython first, so
        the backend stub embeds the same Python that runs qwen2edge."""
        libs = [str(self.lib_dir), sysconfig.get_config_var("LIBDIR") or ""]
        old = os.environ.get("LD_LIBRARY_PATH", "")
        path = [str(self.stub_python / "bin"), os.environ.get("PATH", "")]
        return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in [*libs, old] if p),
                "PATH": os.pathsep.join(p for p in path if p)}


def _unpack(wheel: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(dest)
    except (zipfile.BadZipFile, OSError) as exc:
        raise TritonUnavailable(f"{wheel} is not a readable wheel ({exc}): delete it and fetch it again") from None
    server = dest / "pytriton" / "tritonserver"
    stub = server / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / \
        "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonUnavailable(f"{wheel.name} has no Python backend stub for Python {sys.version_info[0]}."
                                f"{sys.version_info[1]}: run with a Python it ships a stub for")
    shutil.copyfile(stub, server / "backends" / "python" / stub.name)
    for exe in (server / "bin" / "tritonserver", server / "backends" / "python" / stub.name):
        exe.chmod(0o755)  # zip members lose their mode bits


def _stub_venv(dest: Path, timeout: float = 600) -> None:
    """A venv of this Python holding only STUB_NUMPY (installed by this Python's pip)."""
    import venv

    venv.create(dest, with_pip=False, symlinks=True)
    site_packages = next((dest / "lib").glob("python3*/site-packages"))
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
           "--target", str(site_packages), STUB_NUMPY]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DownloadFailed(f"`pip install {STUB_NUMPY}` for the backend stub failed ({exc}): check the "
                             "network") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise DownloadFailed(f"`pip install {STUB_NUMPY}` for the backend stub failed ({last}): check the "
                             "network")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """tritonserver on 127.0.0.1 (HTTP, gRPC, metrics on free ports) over one model repository."""

    def __init__(self, install: TritonInstall, repo: str | Path, log_path: str | Path, *extra: str,
                 ready_timeout: float = 300.0):
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = Path(log_path)
        cmd = [str(install.binary), f"--model-repository={repo}", f"--backend-directory={install.backend_dir}",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}", "--allow-gpu-metrics=false",
               *extra]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=install.env())
        deadline = time.monotonic() + ready_timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise TritonUnavailable(f"tritonserver exited with {self.proc.returncode} while loading: "
                                        f"see {self.log_path}\n" + "\n".join(self.errors()[-5:]))
            if time.monotonic() > deadline:
                self.stop()
                raise TritonUnavailable(f"tritonserver was not ready in {ready_timeout:.0f} s: see {self.log_path}")
            time.sleep(0.25)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def errors(self) -> list[str]:
        """The log's error lines, without the ones every CPU-only machine logs (no CUDA driver)."""
        return [line for line in self.log().splitlines()
                if (line.startswith("E") or line.startswith("error:")) and "Cuda" not in line]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as Kubernetes stops a pod; returns the exit code (killed after `timeout`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "TritonServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m qwen2edge.triton.local CACHE_DIR`: prepare the install, print how to run it."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m qwen2edge.triton.local CACHE_DIR", file=sys.stderr)
        return 2
    try:
        install = TritonInstall.prepare(args[0])
    except TritonUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    env = install.env()
    print(f"LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']} PATH={install.stub_python / 'bin'}:$PATH \\\n"
          f"  {install.binary} --backend-directory={install.backend_dir} --model-repository=REPO \\\n"
          "  --http-address=127.0.0.1 --grpc-address=127.0.0.1 --metrics-address=127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())

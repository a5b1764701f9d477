"""scripts/check_aarch64.sh: a device archive installed and run on aarch64 (qemu user emulation, Debian arm64
chroot) generates the same greedy tokens as on this x86-64 machine.

Needs root, debootstrap and qemu-user-static, and network to Debian and PyPI; skipped with the reason
otherwise (CI installs none of them, so it skips there). The first run builds and caches the arm64 root
filesystem (~7 minutes here); later runs reuse it. What this does and does not show: docs/jetson.md.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qwen2edge.device_bundle import pack_bundle

from .test_cli import run_cli

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_aarch64.sh"
GENERATE = ["--prompt-ids", "5,6,7,8,9", "--max-new-tokens", "12", "--temperature", "0", "--json"]


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, mount and chroot): run the suite as root to include it"
    missing = [t for t in ("debootstrap", "qemu-aarch64-static", "chroot") if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (apt-get install -y debootstrap qemu-user-static "
                "binfmt-support); CI does not install them")
    return None


@pytest.mark.slow
@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_device_archive_generates_the_same_tokens_on_aarch64(tiny_bundle_factory, tmp_path):
    _, bundle = tiny_bundle_factory("gqa")
    archive = tmp_path / "tiny.tar.gz"
    pack_bundle(bundle, archive)
    proc = subprocess.run(["bash", str(SCRIPT), str(archive)], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 and any(s in proc.stderr for s in ("cannot mount binfmt_misc", "Could not find a version",
                                                                "NewConnectionError", "debootstrap failed")):
        pytest.skip(f"no emulated aarch64 here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    aarch64 = json.loads(proc.stdout.strip().splitlines()[-1])
    assert aarch64["machine"] == "aarch64"
    host = run_cli("generate", str(bundle), *GENERATE, block_torch=True)
    assert host.returncode == 0, host.stderr
    x86 = json.loads(host.stdout)
    assert len(x86["token_ids"]) == 12
    assert aarch64["prompt_ids"] == x86["prompt_ids"] == [5, 6, 7, 8, 9]
    assert aarch64["token_ids"] == x86["token_ids"]

"""Preparing a local tritonserver from the nvidia-pytriton wheel: failures are clear and leave nothing half-done."""

from __future__ import annotations

import pytest

from qwen2edge.triton.local import DownloadFailed, TritonInstall, TritonUnavailable, fetch_wheel


def test_a_failed_download_says_so(tmp_path):
    with pytest.raises(DownloadFailed, match=r"`pip download nvidia-pytriton==0\.0\.0\.999` failed"):
        fetch_wheel(tmp_path, "nvidia-pytriton==0.0.0.999")


def test_a_broken_wheel_is_refused_and_nothing_is_left_unpacked(tmp_path):
    (tmp_path / "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl").write_bytes(b"not a zip")
    with pytest.raises(TritonUnavailable, match="is not a readable wheel"):
        TritonInstall.prepare(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl"]

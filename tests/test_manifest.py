"""Manifests, checksums and atomic artifact directories."""

import pytest

from qwen2edge.errors import BundleError
from qwen2edge.manifest import atomic_directory, read_manifest, write_manifest


def test_checksums_detect_modification(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"hello")
    write_manifest(tmp_path, {"schema_version": 1})
    assert read_manifest(tmp_path)["files"]["a.bin"]["bytes"] == 5
    (tmp_path / "a.bin").write_bytes(b"hellO")
    with pytest.raises(BundleError, match="fails its manifest checksum"):
        read_manifest(tmp_path)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(BundleError, match="missing"):
        read_manifest(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        read_manifest(tmp_path)


def test_atomic_directory_leaves_nothing_on_interrupt(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as tmp:
            (tmp / "model.onnx").write_bytes(b"half")
            raise KeyboardInterrupt
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_previous_only_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("boom")
    assert (final / "v").read_text() == "1"  # the good old artifact survives a failed rewrite
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("3")
    assert (final / "v").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

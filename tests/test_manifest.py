"""Manifests, checksums, atomic artifact directories and where they may be written."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from qwen2edge.errors import BundleError, InputError
from qwen2edge.manifest import atomic_directory, read_manifest, recover_interrupted, verify_files, write_manifest


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


@pytest.mark.parametrize("rel, meta, needle", [
    ("a.bin", {"sha256": "0" * 64}, "malformed entry for 'a.bin'"),  # no bytes: once a KeyError, exit 1
    ("a.bin", {"sha256": "0" * 64, "bytes": "5"}, "malformed entry"),
    ("a.bin", "not a dict", "malformed entry"),
    ("../secret", {"sha256": "0" * 64, "bytes": 1}, "a path outside its directory"),
    ("/etc/hostname", {"sha256": "0" * 64, "bytes": 1}, "a path outside its directory"),
])
def test_malformed_or_escaping_entries_are_one_line_errors(tmp_path, rel, meta, needle):
    with pytest.raises(BundleError, match=needle) as exc:
        verify_files(tmp_path, {rel: meta})
    assert "\n" not in str(exc.value)


def _artifact(path, version: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "v").write_text(version)
    write_manifest(path, {"kind": "test"})


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
        _artifact(tmp, "1")
    with pytest.raises(RuntimeError):
        with atomic_directory(final, overwrite=True) as tmp:
            _artifact(tmp, "2")
            raise RuntimeError("boom")
    assert (final / "v").read_text() == "1"  # the good old artifact survives a failed rewrite
    with atomic_directory(final, overwrite=True) as tmp:
        _artifact(tmp, "3")
    assert (final / "v").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_directory_qwen2edge_did_not_write_is_never_replaced(tmp_path):
    """`mkdir d; echo x > d/keep; qwen2edge export CKPT -o d` used to delete keep."""
    final = tmp_path / "d"
    final.mkdir()
    (final / "keep").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(InputError, match=r"holds keep, which no qwen2edge manifest there lists.*pass another output"):
            with atomic_directory(final, overwrite):
                pass
    assert (final / "keep").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with atomic_directory(tmp_path / "empty") as tmp:  # an empty directory is fine
        _artifact(tmp, "1")


def test_an_artifact_is_replaced_only_with_overwrite_and_only_if_untouched(tmp_path):
    final = tmp_path / "out"
    _artifact(final, "1")
    (final / ".ort-cache" / "x").mkdir(parents=True)  # what runs write beside a bundle is no obstacle
    (final / ".ort-cache" / "x" / "g.onnx").write_text("graph")
    with pytest.raises(InputError, match=r"already holds a qwen2edge artifact: pass overwrite to replace it"):
        with atomic_directory(final):
            pass
    _artifact(final / "engine", "e")  # a nested artifact (build-engine's) belongs to it too
    (final / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds notes.txt"):
        with atomic_directory(final, overwrite=True):
            pass
    (final / "notes.txt").unlink()
    with pytest.raises(InputError, match="holds a qwen2edge test output, not a onnx-bundle"):
        with atomic_directory(final, overwrite=True, kind="onnx-bundle"):  # e.g. export over a compare report
            pass
    with atomic_directory(final, overwrite=True, kind="test") as tmp:
        _artifact(tmp, "2")
    assert (final / "v").read_text() == "2"


def test_the_output_is_never_an_input_or_a_directory_holding_one(tmp_path, monkeypatch):
    model = tmp_path / "model"
    _artifact(model, "1")  # even a qwen2edge artifact: it is the input
    with pytest.raises(InputError, match="the output .* is the input"):
        with atomic_directory(model, overwrite=True, inputs=[model]):
            pass
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # `unbundle a.tar.gz -o .`
    with pytest.raises(InputError, match=f"the output {tmp_path} contains the input a.tar.gz"):
        with atomic_directory(".", overwrite=True, inputs=["a.tar.gz"]):
            pass
    assert (model / "v").read_text() == "1" and archive.read_bytes() == b"x"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file or a symbolic link, not a directory"):
        with atomic_directory(tmp_path / "file"):
            pass


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from qwen2edge import manifest

    final, when = Path(sys.argv[1]).absolute(), sys.argv[2]
    real_replace = os.replace

    def replace(src, dst):
        if when == "between" and Path(dst) == final:  # the old artifact is already moved aside
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    os.replace = replace
    with manifest.atomic_directory(final, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
        manifest.write_manifest(tmp, {"kind": "test"})
        if when == "inside":
            os.kill(os.getpid(), signal.SIGKILL)
""")


def _killed(final, when: str) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(final), when], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_a_kill_between_the_renames_of_a_replace_is_undone_by_the_next_run(tmp_path):
    final = tmp_path / "out"
    _artifact(final, "1")
    _killed(final, "between")
    assert not final.exists()  # what the kill leaves: the old artifact aside, the new one complete
    assert {p.name.rsplit(".", 1)[-1] for p in tmp_path.iterdir()} == {"old", "partial"}
    with pytest.raises(InputError, match="already holds a qwen2edge artifact"):  # restored, then protected
        with atomic_directory(final):
            pass
    assert (final / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    read_manifest(final)


def test_partial_directories_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    final = tmp_path / "out"
    _killed(final, "inside")
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".out.") and leftover.name.endswith(".partial")
    live = tmp_path / f".out.{os.getpid()}.x1.partial"  # a run still going: never touched
    live.mkdir()
    assert recover_interrupted(final) == [f"removed {leftover.name}, left by an interrupted run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]
    with atomic_directory(final) as tmp:
        _artifact(tmp, "1")
    assert (final / "v").read_text() == "1"

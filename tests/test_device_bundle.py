"""Device bundles: round trip, checksum failure, unsafe archive members, and a torch-free install."""

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from qwen2edge.device_bundle import (PACKAGE, README, REQUIREMENTS, RUNTIME_REQUIREMENTS, TENSORRT_REQUIREMENTS,
                                     pack_bundle, unpack_bundle, wheel_name)
from qwen2edge.errors import BundleError, InputError
from qwen2edge.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def packed(tiny_bundle_factory, tmp_path_factory):
    _, bundle = tiny_bundle_factory("gqa")
    out = tmp_path_factory.mktemp("pack") / "model.tar.gz"
    pack_bundle(bundle, out)
    return bundle, out


def test_runtime_requirements_equal_pyproject_dependencies():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert list(RUNTIME_REQUIREMENTS) == deps
    assert not any("torch" in d or "transformers" in d for d in deps)


def test_tensorrt_extras_pin_polygraphy_and_one_cuda_major():
    """Every Polygraphy requirement is >=0.53.4 (NumPy 2 and pip's libcudart), the device bundle's TensorRT
    requirements are the `tensorrt` extra, and each tensorrt-cuXX extra names its own CUDA major's wheel."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert list(TENSORRT_REQUIREMENTS) == extras["tensorrt"]
    polygraphy = [Requirement(r) for reqs in extras.values() for r in reqs if r.startswith("polygraphy")]
    polygraphy += [Requirement(r) for r in TENSORRT_REQUIREMENTS]
    assert len(polygraphy) >= 4
    for req in polygraphy:
        assert not req.specifier.contains("0.53.3") and not req.specifier.contains("0.49.12"), req
        assert req.specifier.contains("0.53.4"), req
    for major in ("12", "13"):
        names = {Requirement(r).name for r in extras[f"tensorrt-cu{major}"]}
        assert names == {f"tensorrt-cu{major}", "polygraphy"}
    assert not any(Requirement(r).name == "tensorrt" for reqs in extras.values() for r in reqs)


def test_round_trip(packed, tmp_path):
    bundle, archive = packed
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == PACKAGE
    assert {"model.onnx", "manifest.json", "tokenizer.json", REQUIREMENTS, README, f"wheels/{wheel_name()}"} <= set(names)
    assert not any(n.startswith("engine/") for n in names)
    out = tmp_path / "unpacked"
    unpack_bundle(archive, out)
    for rel in ("model.onnx", "tokenizer.json", "manifest.json"):
        assert (out / rel).read_bytes() == (bundle / rel).read_bytes()
    reqs = (out / REQUIREMENTS).read_text()
    assert "torch" not in reqs.replace("no torch", "") and "onnxruntime" in reqs
    opened = Bundle.open(out)
    assert opened.spec.input_names == Bundle.open(bundle).spec.input_names


def _rewrite(archive: Path, dest: Path, edit, extra: dict[str, bytes] | None = None) -> Path:
    """Copy `archive` member by member, letting `edit(name, data)` change data or return None to drop it;
    `extra` members are appended."""
    with tarfile.open(archive) as src, tarfile.open(dest, "w:gz", compresslevel=1) as out:
        members = [(m.name, src.extractfile(m).read()) for m in src.getmembers()]
        for name, data in [*members, *(extra or {}).items()]:
            data = edit(name, data)
            if data is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return dest


def test_corrupted_member_fails_its_checksum_and_leaves_nothing(packed, tmp_path):
    _, archive = packed
    bad = _rewrite(archive, tmp_path / "bad.tar.gz",
                   lambda n, d: d[:-1] + bytes([d[-1] ^ 1]) if n == "tokenizer.json" else d)
    out = tmp_path / "out"
    with pytest.raises(BundleError, match="tokenizer.json .* fails its checksum"):
        unpack_bundle(bad, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_unlisted_and_missing_members_are_refused(packed, tmp_path):
    _, archive = packed
    dropped = _rewrite(archive, tmp_path / "dropped.tar.gz", lambda n, d: None if n == "model.onnx" else d)
    with pytest.raises(BundleError, match="lacks 'model.onnx'"):
        unpack_bundle(dropped, tmp_path / "o1")
    extra = tarfile.TarInfo("extra.py")
    extra.size = 1
    with pytest.raises(BundleError, match="'extra.py', which PACKAGE.json does not list"):
        unpack_bundle(_evil(tmp_path, extra), tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def _evil(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        pkg = json.dumps({"files": {}}).encode()
        info = tarfile.TarInfo(PACKAGE)
        info.size = len(pkg)
        tar.addfile(info, io.BytesIO(pkg))
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "fifo", "backslash"])
def test_unsafe_members_are_refused_before_anything_is_written(kind, tmp_path):
    if kind == "absolute":
        m = tarfile.TarInfo(str(tmp_path / "pwned"))
    elif kind == "dotdot":
        m = tarfile.TarInfo("a/../../pwned")
    elif kind == "backslash":
        m = tarfile.TarInfo("..\\pwned")
    else:
        m = tarfile.TarInfo("link")
        m.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
        m.linkname = "/etc/passwd"
    if m.isfile():
        m.size = 1
    archive = _evil(tmp_path, m)
    out = tmp_path / "out"
    with pytest.raises(BundleError, match="refusing to unpack"):
        unpack_bundle(archive, out)
    assert not out.exists() and not (tmp_path / "pwned").exists() and not (tmp_path.parent / "pwned").exists()


def test_bad_inputs(tmp_path, tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    with pytest.raises(InputError, match=r"\.tar\.gz"):
        pack_bundle(bundle, tmp_path / "x.zip")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    (tmp_path / "gzip.tar.gz").write_bytes(gzip.compress(b"a gzip file, but no tar inside"))
    with zipfile.ZipFile(tmp_path / "zip.tar.gz", "w") as zf:
        zf.writestr("manifest.json", "{}")
    for junk in ("junk", "gzip", "zip"):  # once a five-line error listing every decompressor tried
        with pytest.raises(BundleError, match=r"is not a \.tar\.gz written by `qwen2edge bundle`") as exc:
            unpack_bundle(tmp_path / f"{junk}.tar.gz", tmp_path / "o")
        assert "\n" not in str(exc.value)
    with pytest.raises(InputError, match="does not exist"):
        unpack_bundle(tmp_path / "nope.tar.gz", tmp_path / "o")


@pytest.mark.slow
def test_torch_free_install_from_the_bundle_in_a_fresh_venv(packed, tmp_path):
    """What the device README says: fresh venv (no system site-packages), pip install the bundle's
    requirements from PyPI, install the packed wheel, unbundle and generate."""
    _, archive = packed
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    staging = tmp_path / "staging"
    unpack_bundle(archive, staging)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"HF_HUB_OFFLINE": "1"}
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # polygraphy is pure Python and installs without TensorRT; tensorrt itself is not in the file.
    r = subprocess.run([*pip, "-r", str(staging / REQUIREMENTS)], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0 and ("Could not find a version" in r.stderr or "NewConnectionError" in r.stderr):
        pytest.skip(f"PyPI not reachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*pip, "--no-deps", str(staging / "wheels" / wheel_name())], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cli = venv / "bin" / "qwen2edge"
    out = tmp_path / "device-model"
    r = subprocess.run([str(cli), "unbundle", str(archive), "-o", str(out)], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(cli), "generate", str(out), "--prompt", "Hello", "--chat", "--max-new-tokens", "4",
                        "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["prompt_ids"][0] == 151644 and 1 <= len(result["token_ids"]) <= 4
    check = subprocess.run([str(py), "-c", "import importlib.util as u, qwen2edge, sys;"
                            "sys.exit(any(u.find_spec(m) for m in ('torch', 'transformers', 'onnx')))"],
                           env=env, cwd=tmp_path)
    assert check.returncode == 0, "the device venv must not contain torch, transformers or onnx"


def test_members_the_bundle_manifest_does_not_list_are_refused(packed, tmp_path):
    """PACKAGE.json comes with the archive, so it cannot vouch for extra members: a planted optimized-graph
    cache listed there (checksums right) would otherwise be unpacked beside the model and run unverified."""
    _, archive = packed
    planted = ".ort-cache/0123456789abcdef-ort1.0-x86_64/model.optimized.onnx"
    graph = b"another model's graph"

    def edit(name, data):
        if name != PACKAGE:
            return data
        package = json.loads(data)
        package["files"][planted] = {"sha256": hashlib.sha256(graph).hexdigest(), "bytes": len(graph)}
        return json.dumps(package).encode()

    with_member = _rewrite(archive, tmp_path / "planted.tar.gz", edit, extra={planted: graph})
    out_dir = tmp_path / "out"
    with pytest.raises(BundleError, match=f"holds '{planted}', which the bundle's manifest.json does not list"):
        unpack_bundle(with_member, out_dir)
    assert not out_dir.exists()


def test_unbundle_output_rules(packed, tmp_path, monkeypatch):
    """Never into a directory holding other files, never over the archive (`-o .`), and over an earlier
    unbundle only with overwrite."""
    _, archive = packed
    local = tmp_path / "model.tar.gz"
    shutil.copyfile(archive, local)
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="contains the input model.tar.gz"):
        unpack_bundle("model.tar.gz", ".", overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="holds notes.txt"):
        unpack_bundle(local, mine, overwrite=True)
    unpack_bundle(local, tmp_path / "out")
    with pytest.raises(InputError, match="already holds a qwen2edge artifact: pass overwrite"):
        unpack_bundle(local, tmp_path / "out")
    unpack_bundle(local, tmp_path / "out", overwrite=True)
    Bundle.open(tmp_path / "out")
    assert local.is_file() and (tmp_path / "keep.txt").read_text() == "mine" and (mine / "notes.txt").is_file()


def test_unbundle_cli_refuses_a_non_tar_archive_and_its_own_directory_in_one_line(packed, tmp_path):
    """Through the real command: a non-tar archive was a five-line error (exit 1); `unbundle a.tar.gz -o .`
    deleted the directory's files and the archive. Both are one line, exit 2, and nothing is touched."""
    from .test_cli import assert_one_line_error, run_cli

    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(gzip.compress(b"a gzip file, but no tar inside"))
    proc = run_cli("unbundle", str(junk), "-o", str(tmp_path / "out"), block_torch=True)
    assert_one_line_error(proc, BundleError.exit_code, "is not a .tar.gz written by `qwen2edge bundle`")
    assert not (tmp_path / "out").exists()
    shutil.copyfile(packed[1], tmp_path / "model.tar.gz")
    (tmp_path / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    cmd = [sys.executable, "-m", "qwen2edge.cli", "unbundle", "model.tar.gz", "-o", ".", "--overwrite"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert_one_line_error(proc, InputError.exit_code, "contains the input model.tar.gz")
    assert "pass another --output" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "keep.txt").read_text() == "mine"

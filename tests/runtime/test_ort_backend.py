"""The ONNX Runtime backend's decode hot path and its optimized-graph cache, on real sessions."""

import json
import shutil

import numpy as np
import pytest

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.ort_backend import ORT_CACHE
from qwen2edge.runtime.ort_cache import CACHE_RECORD, OPTIMIZED_FILE
from qwen2edge.runtime.sampling import SamplingParams
from qwen2edge.validation.engine import teacher_forced


def test_io_binding_steps_match_plain_runs(tiny_bundle_factory, tmp_path):
    _, path = tiny_bundle_factory("gqa")
    bundle = Bundle.open(path)
    plain = bundle.backend("ort", io_binding=False, optimized_model_path=tmp_path / "a.onnx")
    bound = bundle.backend("ort", io_binding=True, optimized_model_path=tmp_path / "b.onnx")
    prompt, forced = [11, 22, 33, 44, 55], [7, 8, 9, 10, 11, 12]
    a = teacher_forced(bundle.generator(plain), prompt, forced)
    b = teacher_forced(bundle.generator(bound), prompt, forced)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # same kernels; caller-owned logits per step
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(-1,))
    ra, _ = bundle.generator(plain).generate([[1, 2, 3], [4, 5, 6, 7, 8]], params)
    rb, _ = bundle.generator(bound).generate([[1, 2, 3], [4, 5, 6, 7, 8]], params)
    assert [r.token_ids for r in ra] == [r.token_ids for r in rb]


def test_optimized_graph_is_cached_beside_the_bundle(tiny_bundle_factory):
    _, path = tiny_bundle_factory("mqa_tied")
    bundle = Bundle.open(path)
    shutil.rmtree(path / ORT_CACHE, ignore_errors=True)  # other tests may have loaded this bundle already
    first = bundle.backend("ort")
    second = bundle.backend("ort")
    assert not first.optimized_from_cache and first.reopened  # optimized, saved, then loaded the saved graph
    assert second.optimized_from_cache and not second.reopened
    sha = bundle.manifest.files["model.onnx"].sha256
    (entry,) = (path / ORT_CACHE).iterdir()
    assert entry.name.startswith(sha[:16]) and (entry / CACHE_RECORD).is_file()
    assert not [p for p in (path / ORT_CACHE).iterdir() if p.name.startswith(".partial")]
    ids = [[5, 6, 7, 8]]
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(-1,))
    assert (bundle.generator(first).generate(ids, params)[0][0].token_ids
            == bundle.generator(second).generate(ids, params)[0][0].token_ids)
    Bundle.open(path)  # the cache is outside the manifest: verification still passes


@pytest.fixture(scope="module")
def twin_bundles(tiny_bundle_factory, tiny_model_factory, tmp_path_factory):
    """A private copy of the gqa bundle, and an export of the same architecture with other weights."""
    from qwen2edge.exporter.export import ExportOptions, export_bundle

    from ..conftest import TINY_MAX_SEQ_LEN

    _, src = tiny_bundle_factory("gqa")
    root = tmp_path_factory.mktemp("twins")
    shutil.copytree(src, root / "bundle", ignore=shutil.ignore_patterns(ORT_CACHE))
    export_bundle(tiny_model_factory("gqa_seed1", seed=1), root / "other", ExportOptions(max_seq_len=TINY_MAX_SEQ_LEN))
    return root / "bundle", root / "other"


def _tokens(backend, bundle) -> list[int]:
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(-1,))
    return bundle.generator(backend).generate([[5, 6, 7, 8]], params)[0][0].token_ids


@pytest.mark.parametrize("tamper", ["graph", "whole_cache", "record_rewritten"])
def test_a_tampered_optimized_graph_cache_is_rebuilt_never_run(twin_bundles, tamper):
    """Another model's optimized graph in the cache (its files, its whole signed directory, or its files
    with a record rewritten to match them) is never run: the verified model's graph is rebuilt."""
    path, other = twin_bundles
    bundle, twin = Bundle.open(path), Bundle.open(other)
    shutil.rmtree(path / ORT_CACHE, ignore_errors=True)
    want, theirs = _tokens(bundle.backend("ort"), bundle), _tokens(twin.backend("ort"), twin)
    assert want != theirs  # the twin really is another model
    (entry,), (twin_entry,) = (path / ORT_CACHE).iterdir(), (other / ORT_CACHE).iterdir()
    if tamper == "whole_cache":
        shutil.rmtree(entry)
        shutil.copytree(twin_entry, entry)
    else:
        for f in (OPTIMIZED_FILE, OPTIMIZED_FILE + ".data"):
            shutil.copyfile(twin_entry / f, entry / f)
        if tamper == "record_rewritten":
            record = json.loads((entry / CACHE_RECORD).read_text())
            record["files"] = json.loads((twin_entry / CACHE_RECORD).read_text())["files"]
            (entry / CACHE_RECORD).write_text(json.dumps(record))
    backend = Bundle.open(path).backend("ort")
    assert not backend.optimized_from_cache
    assert _tokens(backend, bundle) == want
    again = Bundle.open(path).backend("ort")  # and the rebuilt cache is trusted again
    assert again.optimized_from_cache and _tokens(again, bundle) == want


def test_sessions_flush_subnormals_to_zero(tiny_bundle_factory):
    """Subnormal arithmetic is slow on x86 and softmax over a long cache produces it, so every session
    flushes subnormals to zero in its thread pool (ONNX Runtime applies the flag to pool threads only,
    so the effect is measured by benchmarks/long_context.py, not here; this checks the wiring)."""
    bundle = Bundle.open(tiny_bundle_factory("gqa")[1])
    for backend in (bundle.backend("ort"), bundle.backend("ort", optimized_cache=None)):
        opts = backend.session.get_session_options()
        assert opts.get_session_config_entry("session.set_denormal_as_zero") == "1"

"""The ONNX Runtime backend's decode hot path and its optimized-graph cache, on real sessions."""

import shutil

import numpy as np

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.ort_backend import ORT_CACHE
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
    assert entry.name.startswith(sha[:16]) and (entry / ".complete").is_file()
    assert not [p for p in (path / ORT_CACHE).iterdir() if p.name.startswith(".partial")]
    ids = [[5, 6, 7, 8]]
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(-1,))
    assert (bundle.generator(first).generate(ids, params)[0][0].token_ids
            == bundle.generator(second).generate(ids, params)[0][0].token_ids)
    Bundle.open(path)  # the cache is outside the manifest: verification still passes



def test_sessions_flush_subnormals_to_zero(tiny_bundle_factory):
    """Subnormal arithmetic is slow on x86 and softmax over a long cache produces it, so every session
    flushes subnormals to zero in its thread pool (ONNX Runtime applies the flag to pool threads only,
    so the effect is measured by benchmarks/long_context.py, not here; this checks the wiring)."""
    bundle = Bundle.open(tiny_bundle_factory("gqa")[1])
    for backend in (bundle.backend("ort"), bundle.backend("ort", optimized_cache=None)):
        opts = backend.session.get_session_options()
        assert opts.get_session_config_entry("session.set_denormal_as_zero") == "1"

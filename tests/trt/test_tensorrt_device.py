"""On a machine with TensorRT and an NVIDIA GPU: build an engine and compare TensorRT with ONNX Runtime.

Skipped (with the reason) everywhere else, which so far is everywhere these tests have been run.
"""

import importlib.util

import numpy as np
import pytest

pytestmark = pytest.mark.tensorrt


def _skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return ("TensorRT is not installed (pip install 'qwen2edge[tensorrt-cu12]' or '[tensorrt-cu13]' on a GPU "
                "machine, matching the driver's CUDA major)")
    if importlib.util.find_spec("polygraphy") is None:
        return "polygraphy is not installed"
    try:
        from qwen2edge.trt.device import gpu_info

        gpu_info()
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable GPU here
        return f"no usable NVIDIA GPU ({exc})"
    return None


REASON = _skip_reason()
needs_trt = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@needs_trt
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_engine_matches_onnx_runtime(tiny_bundle_factory, tmp_path, dtype):
    import shutil

    from qwen2edge.runtime.bundle import Bundle
    from qwen2edge.runtime.sampling import SamplingParams
    from qwen2edge.trt.builder import EngineOptions, build_engine

    _, src = tiny_bundle_factory("gqa", dtype=dtype)
    bundle = tmp_path / "b"
    shutil.copytree(src, bundle)
    manifest = build_engine(bundle, EngineOptions(max_batch=2, max_input_len=32))
    assert (bundle / "engine" / "model.plan").is_file() and manifest["precision"] == dtype
    b = Bundle.open(bundle)
    ort, trt = b.backend("ort"), b.backend("trt")
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(-1,))
    ref, _ = b.generator(ort).generate(prompts, params)
    got, _ = b.generator(trt).generate(prompts, params)
    if dtype == "fp32":  # fp16 kernels differ between ORT CPU and TensorRT: near-ties may flip there
        assert [r.token_ids for r in got] == [r.token_ids for r in ref]
    cache_o, cache_t = ort.new_cache(1), trt.new_cache(1)
    from qwen2edge.runtime.generator import prefill_feed

    feed = prefill_feed([prompts[0]], b.max_seq_len, 0)
    lo = ort.step(cache_o, feed, np.zeros(1, np.int64))
    lt = trt.step(cache_t, feed, np.zeros(1, np.int64))
    np.testing.assert_allclose(lt, lo, atol=2e-3 if dtype == "fp32" else 5e-2)
    trt.close()

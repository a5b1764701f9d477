"""YaRN exported with a cache longer than original_max_position_embeddings, vs transformers there."""

import numpy as np
import pytest

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.validation.engine import teacher_forced

L = 256  # the tiny "yarn" model: factor 4 over L0 = 128, max_position_embeddings 512


@pytest.mark.slow
def test_logits_beyond_original_length_match_transformers(tiny_bundle_factory, hf_reference_factory):
    model_dir, bundle_dir = tiny_bundle_factory("yarn", max_seq_len=L)
    bundle = Bundle.open(bundle_dir)
    assert bundle.manifest.long_context.mode == "yarn"
    ref = hf_reference_factory(model_dir)
    prompt = [int(x) for x in np.random.default_rng(3).integers(0, 151000, size=180)]
    forced = ref.greedy(prompt, 60)  # decode positions 180..239, all past L0 = 128
    want = ref.logits(prompt + forced)
    got = teacher_forced(bundle.generator(), prompt, forced)
    beyond = slice(128, None)
    err = float(np.abs(got[beyond] - want[beyond]).max())
    print(f"YaRN ONNX vs transformers at positions 128..239: max |delta logit| {err:.3g}")
    assert err < 1e-4 and np.abs(got[:128] - want[:128]).max() < 1e-4
    assert np.abs(want[beyond]).max() > 0.5

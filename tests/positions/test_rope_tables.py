"""YaRN rotary tables: the spec's worked example, and equality with the INSTALLED transformers' tables."""

import math

import numpy as np
import pytest

from qwen2edge.config import RopeScaling, config_from_hf
from qwen2edge.positions.rope import default_inv_freq, rotary_tables, yarn_correction_range, yarn_inv_freq

# Spec section 1.4: D=64, b=1e6, s=4, L0=32768.
RATIOS_1_4 = {11: 1.0, 12: .9167, 13: .8333, 14: .75, 15: .6667, 16: .5833, 17: .5, 18: .4167, 19: .3333, 20: .25}


def test_worked_example_section_1_4():
    sc = RopeScaling(factor=4.0, original_max_position_embeddings=32768)
    assert yarn_correction_range(64, 1e6, 32768, 32, 1, truncate=True) == (11, 20)
    inv, af = yarn_inv_freq(64, 1e6, sc, 131072)
    ratio = inv / default_inv_freq(64, 1e6)
    for d, want in RATIOS_1_4.items():
        assert ratio[d] == pytest.approx(want, abs=1e-4), d
    assert np.allclose(ratio[:11], 1.0) and np.allclose(ratio[20:], 0.25)
    assert default_inv_freq(64, 1e6)[12] == pytest.approx(5.6234e-3, rel=1e-4)
    assert inv[12] == pytest.approx(5.1548e-3, rel=1e-4) and inv[20] == pytest.approx(4.4457e-5, rel=1e-4)
    assert af == pytest.approx(1.138629, abs=1e-6) and af ** 2 == pytest.approx(1.296477, abs=1e-6)
    inv_nt, _ = yarn_inv_freq(64, 1e6, RopeScaling(factor=4.0, original_max_position_embeddings=32768,
                                                   truncate=False), 131072)
    low, high = yarn_correction_range(64, 1e6, 32768, 32, 1, truncate=False)
    assert low == pytest.approx(11.798, abs=1e-3) and high == pytest.approx(19.825, abs=1e-3)
    ramp_12 = (1 - inv_nt[12] / default_inv_freq(64, 1e6)[12]) / 0.75  # theta' = theta (1 - ramp * 3/4)
    assert ramp_12 == pytest.approx(0.0252, abs=1e-4)


BASE = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}

YARN_CASES = {
    "qwen2.5-card": ({"rope_theta": 1e6, "head_dim": 64}, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}),
    "no-truncate": ({"rope_theta": 1e6, "head_dim": 64}, {"rope_type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 512, "truncate": False}),
    "mscale-pair": ({"rope_theta": 1e4}, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
                                          "mscale": 1.0, "mscale_all_dim": 0.5}),
    "attention-factor": ({"rope_theta": 5e5}, {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.25,
                                               "beta_fast": 16, "beta_slow": 2}),  # L0 from max_position_embeddings
    "mscale-only": ({"rope_theta": 1e4}, {"rope_type": "yarn", "factor": 3.0, "mscale": 0.707,
                                          "original_max_position_embeddings": 700}),  # mscale alone: ignored
}


@pytest.mark.parametrize("case", sorted(YARN_CASES))
@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_tables_equal_installed_transformers(case, spelling):
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    top, scaling = YARN_CASES[case]
    theta = top["rope_theta"]
    if spelling == "rope_scaling":  # transformers 4.x config.json
        hf = {**BASE, **top, "rope_scaling": dict(scaling)}
    else:  # transformers 5.x: theta inside rope_parameters
        hf = {**BASE, **{k: v for k, v in top.items() if k != "rope_theta"},
              "rope_parameters": {**scaling, "rope_type": "yarn", "rope_theta": theta}}
    cfg = config_from_hf(hf)
    n = 3000  # past every original_max_position_embeddings above
    cos, sin = rotary_tables(cfg, n)
    params = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "yarn", "rope_theta": theta}
    hf_cfg = Qwen2Config(**{k: v for k, v in BASE.items() if k != "model_type"},
                         rope_parameters=params, head_dim=top.get("head_dim", 16))
    emb = Qwen2RotaryEmbedding(hf_cfg)
    with torch.no_grad():
        want_cos, want_sin = emb(torch.zeros(1, dtype=torch.float32), torch.arange(n)[None])
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qwen2edge.positions.rope import rotary_inv_freq

    want_inv, want_af = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    inv, af = rotary_inv_freq(cfg)
    assert af == pytest.approx(want_af, rel=1e-12)
    # Inverse frequencies: at most 1 float32 ulp apart (torch's float32 pow is not correctly rounded).
    np.testing.assert_array_max_ulp(inv, want_inv.numpy(), maxulp=1)
    # Tables: cos/sin rounding (2e-6) plus what an inv_freq ulp becomes at the last position.
    atol = 2e-6 + af * n * float(np.abs(inv - want_inv.numpy()).max())
    assert cos.shape == tuple(want_cos.shape[1:])
    np.testing.assert_allclose(cos, want_cos[0].numpy(), rtol=0, atol=atol)
    np.testing.assert_allclose(sin, want_sin[0].numpy(), rtol=0, atol=atol)
    assert not math.isclose(af, 1.0) or case == "mscale-pair"  # the factor really is folded in


def test_top_level_original_max_position_embeddings_wins():
    """transformers prefers a top-level original_max_position_embeddings (Phi-3 layout) over the dict's."""
    cfg = config_from_hf({**BASE, "original_max_position_embeddings": 1024,
                          "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}})
    assert cfg.rope_scaling.original_max_position_embeddings == 1024

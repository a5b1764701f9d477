"""config.json parsing in the spellings found in the wild."""

import json

import pytest

from qwen2edge.config import ModelConfig, config_from_hf, load_hf_config
from qwen2edge.errors import InputError

BASE = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}


def test_transformers4_top_level_rope_theta_and_rope_scaling():
    cfg = config_from_hf({**BASE, "rope_theta": 1e6,
                          "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    assert cfg.rope_theta == 1e6
    assert cfg.rope_scaling.factor == 4.0 and cfg.rope_scaling.original_max_position_embeddings == 32768
    assert cfg.head_dim == 16 and cfg.kv_groups == 2


def test_transformers5_rope_parameters():
    cfg = config_from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling is None
    cfg = config_from_hf({**BASE, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 2.0,
                                                      "beta_fast": 0, "truncate": False}})
    assert cfg.rope_scaling.factor == 2.0 and cfg.rope_scaling.beta_fast == 32.0  # 0 falls back to the default
    assert cfg.rope_scaling.truncate is False


def test_round_trip_through_manifest_dict():
    cfg = config_from_hf({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
                          "dual_chunk_attention_config": {"chunk_size": 64, "local_size": 8},
                          "eos_token_id": [5, 6]})
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("patch, needle", [
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "unsupported rope type"),
    ({"rope_scaling": {"type": "yarn", "factor": 1.0}}, "factor > 1"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"dual_chunk_attention_config": {"chunk_size": 8, "local_size": 8}}, "local_size < chunk_size"),
])
def test_bad_configs_raise_one_line(patch, needle):
    with pytest.raises(InputError) as exc:
        config_from_hf({**BASE, **patch})
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_load_hf_config_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_hf_config(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        load_hf_config(tmp_path / "file")
    with pytest.raises(InputError, match="config.json is missing"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_hf_config(tmp_path)

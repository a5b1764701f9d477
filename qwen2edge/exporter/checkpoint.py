"""Load a Hugging Face Qwen2 checkpoint (safetensors only, never pickle) into a Qwen2Graph."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import InputError, InternalError


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: single file or a sharded index."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{index} is malformed ({exc}): restore the checkpoint's index file") from None
        files = [model_dir / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{model_dir} lacks shards {', '.join(missing)} named in its index: download them again")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
            raise InputError(
                f"{model_dir} holds only pickle weights (*.bin/*.pt), which qwen2edge never loads (unsafe): "
                "convert them to safetensors first"
            )
        raise InputError(f"{model_dir} holds no *.safetensors weights: pass a complete Qwen2 checkpoint directory")
    return files


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, in its stored dtype."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(model_dir):
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{f} cannot be read ({exc}); the file is truncated or corrupt: download it again") from None
    return tensors


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a Qwen2 checkpoint of this config."""
    c, d, h, hkv, f = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, c), "model.norm.weight": (c,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, c)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c,),
            p + "post_attention_layernorm.weight": (c,),
            p + "self_attn.q_proj.weight": (h * d, c),
            p + "self_attn.q_proj.bias": (h * d,),
            p + "self_attn.k_proj.weight": (hkv * d, c),
            p + "self_attn.k_proj.bias": (hkv * d,),
            p + "self_attn.v_proj.weight": (hkv * d, c),
            p + "self_attn.v_proj.bias": (hkv * d,),
            p + "self_attn.o_proj.weight": (c, h * d),
            p + "mlp.gate_proj.weight": (f, c),
            p + "mlp.up_proj.weight": (f, c),
            p + "mlp.down_proj.weight": (c, f),
        })
    return shapes


def graph_name(hf_name: str) -> str:
    """HF name -> Qwen2Graph parameter name (the mapping is explicit, not a prefix strip by accident)."""
    if hf_name == "lm_head.weight":
        return hf_name
    if not hf_name.startswith("model."):  # check_state_dict only passes names it expects
        raise InternalError(f"unexpected checkpoint tensor name {hf_name!r}: report this as a qwen2edge bug")
    return hf_name[len("model."):]


def check_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor], model_dir: Path) -> None:
    """Raise InputError listing missing, unexpected and mis-shaped tensors."""
    want = expected_shapes(cfg)
    # Some tied checkpoints still store lm_head.weight; it must then equal the embedding's shape.
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    ignorable |= {k for k in tensors if k.endswith("rotary_emb.inv_freq")}
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want) - ignorable)
    misshaped = [f"{k} {tuple(tensors[k].shape)} != {want[k]}" for k in sorted(want) if k in tensors
                 and tuple(tensors[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {_short(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {_short(misshaped)}")
    if problems:
        raise InputError(
            f"weights in {model_dir} do not match config.json ({'; '.join(problems)}): "
            "use the weights saved with this config.json"
        )


def _short(items: list[str], n: int = 4) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_graph_weights(graph: torch.nn.Module, cfg: ModelConfig, model_dir: Path) -> None:
    """Copy the checkpoint into `graph` (fp32 master copy; the export casts afterwards)."""
    tensors = read_state_dict(model_dir)
    check_state_dict(cfg, tensors, model_dir)
    params = dict(graph.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for hf_name in expected_shapes(cfg):
            params[graph_name(hf_name)].copy_(tensors[hf_name].to(torch.float32))

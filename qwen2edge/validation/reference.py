"""The reference a bundle is judged against: the model the bundle claims to be.

Its configuration is the bundle's (every long-context override the export recorded included), the
checkpoint directory supplies the weights, and a quantized bundle's weights are rebuilt the way the
bundle stores them (storage.py). transformers' Qwen2ForCausalLM in fp32 runs it, with the bundle's
rope scaling; for Dual Chunk Attention, which transformers does not implement, the independent
float64 implementation in naive.py does. Both load offline only (never download).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import InputError
from ..runtime.bundle import Bundle
from .storage import LM_HEAD, WeightQuantization

HF_NAME = "transformers Qwen2ForCausalLM fp32 (CPU)"
ROPE_OVERRIDES = ("rope_scaling", "rope_factor", "original_max_position_embeddings")


class Reference(Protocol):
    """What the engine asks of a reference (transformers or the float64 implementation)."""

    name: str
    kind: str

    def logits(self, ids: list[int], prompt_len: int | None = None) -> np.ndarray: ...
    def greedy(self, ids: list[int], steps: int) -> list[int]: ...
    def hidden_states(self, ids: list[int]) -> list[np.ndarray]: ...
    def weights(self) -> dict[str, Any]: ...
    def replace_weights(self, new: dict[str, Any]) -> None: ...


class HFReference:
    """transformers' model for MODEL_DIR (optionally with a given Qwen2Config) in fp32."""

    name = HF_NAME
    kind = "transformers"

    def __init__(self, model_dir: str | Path, config: Any = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import Qwen2ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.torch = torch
        extra = {"config": config} if config is not None else {}
        try:
            self.model = Qwen2ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **extra).eval()
        except (OSError, ValueError) as exc:
            raise InputError(f"transformers could not load {model_dir} ({str(exc).splitlines()[0]}): "
                             "pass the original checkpoint directory") from None

    def logits(self, ids: list[int], prompt_len: int | None = None) -> np.ndarray:
        """Logits [len(ids), V] for every position of one sequence (no per-step state: prompt_len unused)."""
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids]), use_cache=False)
        return out.logits[0].float().numpy()

    def greedy(self, ids: list[int], steps: int) -> list[int]:
        """`steps` greedy tokens (end-of-sequence ids are not special here: the comparison runs full length)."""
        with self.torch.no_grad():
            out = self.model.generate(self.torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps,
                                      do_sample=False, eos_token_id=None, pad_token_id=0,
                                      attention_mask=self.torch.ones(1, len(ids), dtype=self.torch.long))
        return out[0, len(ids):].tolist()

    def hidden_states(self, ids: list[int]) -> list[np.ndarray]:
        """output_hidden_states for one sequence: [embeddings, after layer 0, ..., last layer + final norm],
        each [len(ids), hidden]."""
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([ids]), use_cache=False, output_hidden_states=True)
        return [h[0].float().numpy() for h in out.hidden_states]

    def weights(self) -> dict[str, Any]:
        return {n: p.detach() for n, p in self.model.named_parameters(remove_duplicate=False)}

    def replace_weights(self, new: dict[str, Any]) -> None:
        with self.torch.no_grad():
            if LM_HEAD in new:  # its own tensor from now on (a tied model's head and table differ once quantized)
                self.model.lm_head.weight = self.torch.nn.Parameter(new[LM_HEAD].clone(), requires_grad=False)
            params = dict(self.model.named_parameters(remove_duplicate=False))
            for name, value in new.items():
                if name != LM_HEAD:
                    params[name].copy_(value)


def rope_parameters(bundle: Bundle) -> dict[str, Any]:
    """The bundle's rotary setup in transformers' `rope_parameters` spelling."""
    cfg = bundle.config
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        params.update(rope_type="yarn", factor=rs.factor, beta_fast=rs.beta_fast, beta_slow=rs.beta_slow,
                      truncate=rs.truncate, original_max_position_embeddings=rs.original_max_position_embeddings
                      or cfg.max_position_embeddings)
        params.update({k: v for k, v in (("mscale", rs.mscale), ("mscale_all_dim", rs.mscale_all_dim),
                                         ("attention_factor", rs.attention_factor)) if v is not None})
    if cfg.partial_rotary_factor != 1.0:
        params["partial_rotary_factor"] = cfg.partial_rotary_factor
    return params


def hf_config(model_dir: str | Path, bundle: Bundle) -> Any:
    """transformers' own reading of MODEL_DIR/config.json, with the rope scaling the export's flags set.

    Without rope flags the scaling stays as transformers reads it from config.json, so an exporter that
    misread the file still disagrees with the reference."""
    from transformers import Qwen2Config

    config = Qwen2Config.from_pretrained(str(model_dir))
    if any(k in bundle.manifest.long_context.overrides for k in ROPE_OVERRIDES):
        config.rope_parameters = rope_parameters(bundle)
    return config


def load_reference(model_dir: str | Path, bundle: Bundle) -> Reference:
    """The reference for BUNDLE with MODEL_DIR's weights (not yet quantized: see `quantize`)."""
    if bundle.config.dual_chunk is None:
        return HFReference(model_dir, hf_config(model_dir, bundle))
    from ..exporter.checkpoint import read_state_dict
    from .naive import NaiveQwen2

    tensors = read_state_dict(Path(model_dir))
    return NaiveQwen2(bundle.config.to_dict(), {k: v.double().numpy() for k, v in tensors.items()})


def quantize(ref: Reference, wq: WeightQuantization, tied: bool) -> None:
    """Replace REF's weights by the bundle's quantized grid (storage.py)."""
    import torch

    current = {k: torch.as_tensor(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in ref.weights().items()}
    if tied:
        current.pop(LM_HEAD, None)
    new = wq.apply(current, tied)
    if isinstance(ref, HFReference):
        ref.replace_weights(new)
    else:
        ref.replace_weights({k: v.double().numpy() for k, v in new.items()})


# ---- does the checkpoint match the bundle? (config.json and safetensors headers only: fast) -------

# Fields of the model config that change the forward pass; eos/bos ids and torch_dtype do not.
MATCHED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "rope_theta",
                  "partial_rotary_factor", "max_position_embeddings", "rope_scaling", "dual_chunk")


def check_checkpoint(model_dir: str | Path, bundle: Bundle) -> None:
    """Raise a one-line InputError when MODEL_DIR is not the checkpoint BUNDLE was exported from: its
    config.json (with the overrides the export recorded) or its tensor shapes differ from the bundle's."""
    from ..config import LongContextOverrides, load_hf_config, resolve_long_context
    from ..exporter.checkpoint import expected_shapes, weight_files

    cfg, _ = load_hf_config(model_dir)
    try:
        expected, _ = resolve_long_context(LongContextOverrides(**bundle.manifest.long_context.overrides).apply(cfg))
    except (InputError, TypeError) as exc:
        raise InputError(f"{model_dir} is not the checkpoint {bundle.path} was exported from (its recorded export "
                         f"overrides do not apply: {exc}): pass the model directory given to `qwen2edge export`") from None
    ours, theirs = expected.to_dict(), bundle.config.to_dict()
    diffs = [f"{k} {_short(ours[k])} here vs {_short(theirs[k])} in the bundle" for k in MATCHED_FIELDS
             if ours[k] != theirs[k]]
    if not diffs:
        diffs = _tensor_mismatches(weight_files(Path(model_dir)), expected_shapes(bundle.config))
    if diffs:
        raise InputError(f"{model_dir} is not the checkpoint {bundle.path} was exported from ({'; '.join(diffs[:3])}"
                         f"{'; ...' if len(diffs) > 3 else ''}): pass the model directory given to `qwen2edge "
                         "export`, or re-export the bundle from this one")


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={v}" for k, v in value.items() if v is not None) + "}"
    return str(value)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a .safetensors header (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise InputError(f"{path} cannot be read ({exc}): the file is truncated or corrupt, download it again") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _tensor_mismatches(files: list[Path], want: dict[str, tuple[int, ...]]) -> list[str]:
    have: dict[str, tuple[int, ...]] = {}
    for f in files:
        have.update(safetensors_shapes(f))
    out = [f"no tensor {k}" for k in want if k not in have]
    out += [f"{k} is {list(have[k])} here vs {list(v)} in the bundle" for k, v in want.items()
            if k in have and have[k] != v]
    return out

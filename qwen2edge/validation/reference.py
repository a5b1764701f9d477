"""The independent reference: transformers' Qwen2ForCausalLM in fp32 on the same token ids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError


class HFReference:
    """transformers' model for MODEL_DIR; loads offline only (never downloads)."""

    def __init__(self, model_dir: str | Path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import Qwen2ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.torch = torch
        try:
            self.model = Qwen2ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        except (OSError, ValueError) as exc:
            raise InputError(f"transformers could not load {model_dir} ({str(exc).splitlines()[0]}): "
                             "pass the original checkpoint directory") from None

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), V] for every position of one sequence."""
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

"""Shared by int4_experiments.py and quant_accuracy.py: the evaluation sequences (the built-in
EN/ZH/code/math prompt set of `qwen2edge compare`) and how a model's logits on them are scored
against the fp32 reference (transformers).

Sequences: each "perplexity" text as is; each "generate" prompt in the chat template followed by
the reference's greedy continuation (`--continuation` tokens), so every engine is scored on the
very same token ids. Scores over every predicted position: perplexity (exp of the mean NLL of the
next token), top-1 agreement with the reference's argmax, mean KL(reference || model).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # qwen2edge from this checkout

Logits = Callable[[list[int]], np.ndarray]  # ids -> logits [len(ids), vocab]

# Calibration texts for activation statistics: deliberately NOT the evaluation texts above, so a
# method that uses them is not scored on what it was fitted to.
CALIBRATION_TEXTS = (
    "The museum opened a new wing last spring. Visitors can now walk through a reconstructed workshop "
    "where clockmakers once repaired watches, and a guide explains how each gear was cut by hand.",
    "我们周末去了山上的小村庄。村里的老人给我们讲了很多关于这条河的故事，晚上我们在院子里看星星。",
    "import json\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n\n"
    "config = load('settings.json')\nfor key, value in sorted(config.items()):\n    print(key, '=', value)\n",
    "A train leaves at 9:15 and arrives at 11:45, so the trip takes 2 hours and 30 minutes. "
    "If it travels 180 km, its average speed is 180 / 2.5 = 72 km per hour.",
    "<|im_start|>user\nGive me three tips for learning a new language.<|im_end|>\n<|im_start|>assistant\n"
    "1. Practice a little every day. 2. Listen to native speakers. 3. Do not be afraid of mistakes.",
)


def eval_sequences(model_dir: Path, ref, continuation: int = 32) -> list[tuple[str, list[int]]]:
    """(prompt id, token ids) for every built-in prompt; `ref` is a validation.reference.HFReference."""
    from qwen2edge.runtime.tokenizer import BundleTokenizer
    from qwen2edge.validation.prompts import BUILTIN

    tok = BundleTokenizer.from_dir(model_dir)
    out = []
    for p in BUILTIN:
        if p.kind == "perplexity":
            ids = tok.encode(p.text)
        else:
            ids = tok.encode(tok.chat_prompt(p.text) if tok.has_chat_template else p.text)
            ids = ids + ref.greedy(ids, continuation)
        out.append((p.id, ids))
    return out


def calibration_sequences(model_dir: Path) -> list[list[int]]:
    from qwen2edge.runtime.tokenizer import BundleTokenizer

    tok = BundleTokenizer.from_dir(model_dir)
    return [tok.encode(t) for t in CALIBRATION_TEXTS]


@dataclass(frozen=True)
class Score:
    ppl: float
    ppl_ref: float
    top1: float
    kl: float
    positions: int

    @property
    def ppl_delta(self) -> float:
        return self.ppl / self.ppl_ref - 1.0


def _nll(rows: np.ndarray, ids: list[int]) -> np.ndarray:
    """NLL of ids[1:] given rows [len(ids) - 1, V] (row t predicts ids[t + 1])."""
    from qwen2edge.validation.metrics import log_softmax

    return -log_softmax(rows)[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def score(ref_logits: list[np.ndarray], logits: list[np.ndarray], seqs: list[tuple[str, list[int]]]) -> Score:
    """Pool every predicted position of every sequence."""
    from qwen2edge.validation.metrics import kl_divergence, top1_agreement

    nll, nll_ref, top1, kl = [], [], [], []
    for (_, ids), r, g in zip(seqs, ref_logits, logits):
        r, g = r[: len(ids) - 1], g[: len(ids) - 1]  # the rows that predict a next token
        nll.append(_nll(g, ids))
        nll_ref.append(_nll(r, ids))
        top1.append(top1_agreement(r, g))
        kl.append(kl_divergence(r, g))
    cat = np.concatenate
    return Score(float(np.exp(cat(nll).mean())), float(np.exp(cat(nll_ref).mean())), float(cat(top1).mean()),
                 float(cat(kl).mean()), int(sum(len(x) for x in top1)))


def weight_mb_per_token(cfg: dict, bytes_per_weight: float, lm_head_bytes_per_weight: float | None = None) -> float:
    """MB of weights one decode step reads: every linear layer and the lm_head."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    layers = n * (h * q + 2 * h * kv + q * h + 3 * h * i)
    head = h * cfg["vocab_size"]
    lm = bytes_per_weight if lm_head_bytes_per_weight is None else lm_head_bytes_per_weight
    return (layers * bytes_per_weight + head * lm) / 1e6

"""The one tolerance table of `qwen2edge validate` and `compare` (documented in docs/compare.md).

A row per export precision and per weight quantization scheme; each criterion states which way it
fails. Which row judges a runner: its bundle's dtype for float bundles, and for quantized bundles the
dtype row for `ort-graph` (the graph's own float arithmetic over the quantized weights: exact) and the
scheme row for the fast kernels (`ort`, `trt`). Override any bound with --threshold KEY=VALUE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..bundle_manifest import BundleManifest
from ..errors import InputError

AT_MOST, AT_LEAST = "<=", ">="


@dataclass(frozen=True)
class Criterion:
    """One pass/fail rule: `measure` (a summary field) must be AT_MOST or AT_LEAST the row's bound."""

    key: str
    passes_when: str
    measure: str
    description: str

    def passes(self, value: float, bound: float) -> bool:
        if not math.isfinite(value):
            return False
        return value <= bound if self.passes_when == AT_MOST else value >= bound


CRITERIA: dict[str, Criterion] = {c.key: c for c in (
    Criterion("max_abs", AT_MOST, "max_abs",
              "largest |delta logit| over every compared position (prompt and teacher-forced steps)"),
    Criterion("min_cosine", AT_LEAST, "min_cosine",
              "smallest cosine similarity of one step's logits (or one prompt's prefill logits)"),
    Criterion("max_mean_kl", AT_MOST, "mean_kl", "mean KL(p_ref || p) in nats over all teacher-forced steps"),
    Criterion("min_top1", AT_LEAST, "min_top1", "top-1 agreement over one prompt's teacher-forced steps, worst prompt"),
    Criterion("min_top5", AT_LEAST, "top5", "mean top-5 overlap over all teacher-forced steps"),
    Criterion("min_greedy", AT_LEAST, "min_greedy",
              "free-running greedy tokens equal to the reference's before the first difference, as a fraction "
              "of the steps, worst prompt"),
    Criterion("max_ppl_delta", AT_MOST, "max_ppl_delta",
              "|ppl - ppl_ref| / ppl_ref on the perplexity texts, worst text"),
    Criterion("max_layer_rel", AT_MOST, "max_layer_rel",
              "relative L2 drift ||h - h_ref|| / ||h_ref|| of any hidden state (debug export)"),
)}
DESCRIPTIONS = {k: c.description for k, c in CRITERIA.items()}

# fp32 must match the reference up to arithmetic order: a wrong rotary table, mask or weight costs 1e-1
# and more (one MLP weight scaled by 1.05 costs ~0.4 on the tiny test models). Half precisions change
# the arithmetic, so their logits differ by design: they are judged on the distributions (the default
# model's fp16 bundle: mean KL 3e-6, min cosine 0.99997; that 1.05 weight: KL 1e-3, cosine 0.998).
# int8/int4 rows bound ONNX Runtime's fused MatMulNBits kernel, which runs int8 activations, against
# the reference holding the same quantized weights (default model: mean KL ~3e-3, top-1 98%, worst prompt
# 88%); the export itself is held to the fp32 row on `ort-graph` (backends.py). These rows catch a broken
# kernel, not near-ties: one prompt's top-1 over a few steps is coarse where near-ties abound (a tiny
# random model: 5 of 8 in one prompt at mean KL 3e-4). Set from measured figures with head-room for
# other checkpoints (docs/compare.md).
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": dict(max_abs=2e-3, min_cosine=0.99999, max_mean_kl=1e-5, min_top1=1.0, min_top5=0.98, min_greedy=1.0,
                 max_ppl_delta=1e-3, max_layer_rel=1e-3),
    "fp16": dict(max_abs=0.5, min_cosine=0.9995, max_mean_kl=1e-4, min_top1=0.9, min_top5=0.9, min_greedy=0.0,
                 max_ppl_delta=0.02, max_layer_rel=0.05),
    "bf16": dict(max_abs=1.5, min_cosine=0.995, max_mean_kl=5e-2, min_top1=0.85, min_top5=0.85, min_greedy=0.0,
                 max_ppl_delta=0.05, max_layer_rel=0.15),
    "int8": dict(max_abs=10.0, min_cosine=0.8, max_mean_kl=2e-2, min_top1=0.5, min_top5=0.7, min_greedy=0.0,
                 max_ppl_delta=0.1, max_layer_rel=1e-3),
    "int4": dict(max_abs=10.0, min_cosine=0.8, max_mean_kl=2e-2, min_top1=0.5, min_top5=0.7, min_greedy=0.0,
                 max_ppl_delta=0.1, max_layer_rel=1e-3),
}


def tolerance_row(manifest: BundleManifest, backend: str) -> str:
    """The TOLERANCES row that judges BACKEND on this bundle (see the module docstring)."""
    from .backends import GRAPH

    return manifest.dtype if backend == GRAPH else manifest.tolerance_key


def parse_overrides(items: Sequence[str]) -> dict[str, float]:
    """`KEY=VALUE` strings (from --threshold) to a dict; unknown keys and bad numbers are input errors."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in CRITERIA:
            raise InputError(f"{{opt:threshold}} {item!r} is not KEY=VALUE with a known key: use one of "
                             f"{', '.join(CRITERIA)} (e.g. {{opt:threshold}} max_abs=0.1)")
        try:
            out[key] = float(value)
        except ValueError:
            raise InputError(f"{{opt:threshold}} {item!r}: {value!r} is not a number; write e.g. {key}=0.1") from None
    return out


def thresholds_for(row: str, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Row ROW of the table with OVERRIDES applied."""
    if row not in TOLERANCES:
        raise InputError(f"no tolerances for {row!r}: re-export with {{opt:dtype}} fp32, fp16 or bf16, or {{opt:quantize}} "
                         "int8 or int4")
    return {**TOLERANCES[row], **(overrides or {})}

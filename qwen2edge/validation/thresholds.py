"""Pass/fail thresholds of `qwen2edge compare`, per export precision (documented in docs/compare.md)."""

from __future__ import annotations

from typing import Mapping, Sequence

from ..errors import InputError
from .validate import TOLERANCES

# What each key bounds; "max_*" fail above, "min_*" fail below.
DESCRIPTIONS = {
    "max_abs": "largest |delta logit| over every compared position (prompt and teacher-forced steps)",
    "min_cosine": "smallest cosine similarity of one step's logits (or one prompt's prefill logits)",
    "max_mean_kl": "mean KL(p_ref || p) in nats over all teacher-forced steps",
    "min_top1": "top-1 agreement over one prompt's teacher-forced steps, worst prompt",
    "min_top5": "mean top-5 overlap over all teacher-forced steps",
    "min_greedy": "free-running greedy tokens equal to the reference's before the first difference, "
                  "as a fraction of the steps, worst prompt",
    "max_ppl_delta": "|ppl - ppl_ref| / ppl_ref on the perplexity texts, worst text",
    "max_layer_rel": "relative L2 drift ||h - h_ref|| / ||h_ref|| of any hidden state (debug export)",
}

# fp32 must match transformers up to arithmetic order (a wrong rotary table or mask costs 1e-1 and more);
# half precisions are judged on agreement of the distributions, since their logits differ by design.
# max_abs / min_top1 / min_greedy come from `qwen2edge validate` so the two commands agree.
_REST = {
    "fp32": dict(min_cosine=0.99999, max_mean_kl=1e-5, min_top5=0.98, max_ppl_delta=1e-3, max_layer_rel=1e-3),
    "fp16": dict(min_cosine=0.999, max_mean_kl=1e-2, min_top5=0.9, max_ppl_delta=0.02, max_layer_rel=0.05),
    "bf16": dict(min_cosine=0.995, max_mean_kl=5e-2, min_top5=0.85, max_ppl_delta=0.05, max_layer_rel=0.15),
    # Weight-only quantized bundles (fp32 activations), keyed by scheme like validate's tolerances.
    # Provisional: set from validate's measured int8/int4 figures on the default model, not yet from
    # compare runs. Per-layer drift re-exports at the bundle's dtype, so it shows no quantization error.
    "int8": dict(min_cosine=0.99, max_mean_kl=5e-2, min_top5=0.8, max_ppl_delta=0.05, max_layer_rel=1e-3),
    "int4": dict(min_cosine=0.9, max_mean_kl=0.5, min_top5=0.5, max_ppl_delta=0.25, max_layer_rel=1e-3),
}
DEFAULTS: dict[str, dict[str, float]] = {
    dtype: {"max_abs": tol.max_abs, "min_top1": tol.min_top1,
            "min_greedy": 1.0 if tol.require_greedy_match else 0.0, **_REST[dtype]}
    for dtype, tol in TOLERANCES.items()
}


def parse_overrides(items: Sequence[str]) -> dict[str, float]:
    """`KEY=VALUE` strings (from --threshold) to a dict; unknown keys and bad numbers are input errors."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in DESCRIPTIONS:
            raise InputError(f"--threshold {item!r} is not KEY=VALUE with a known key: use one of "
                             f"{', '.join(DESCRIPTIONS)} (e.g. --threshold max_abs=0.1)")
        try:
            out[key] = float(value)
        except ValueError:
            raise InputError(f"--threshold {item!r}: {value!r} is not a number; write e.g. {key}=0.1") from None
    return out


def thresholds_for(dtype: str, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """The defaults for DTYPE with OVERRIDES applied."""
    if dtype not in DEFAULTS:
        raise InputError(f"no compare thresholds for dtype {dtype!r}: re-export with --dtype fp32, fp16 or bf16")
    return {**DEFAULTS[dtype], **(overrides or {})}

"""`qwen2edge validate`: the quick preset of the accuracy engine (engine.py): three chat prompts and one
perplexity text, no per-layer drift, no report files, and a compact table. Same reference, tolerance
table, checks and exit code as `qwen2edge compare`."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .engine import Plan, run
from .prompts import BUILTIN, Prompt
from .results import ComparisonResult

PROMPTS: tuple[Prompt, ...] = tuple(p for p in BUILTIN if p.id in ("en-capital", "zh-intro", "code-reverse", "ppl-en"))


def validate(model_dir: str | Path, bundle_dir: str | Path, steps: int = 32, backend: str = "ort",
             prompts: Sequence[Prompt] = PROMPTS, long_prompt_tokens: int = 0,
             overrides: Mapping[str, float] | None = None,
             progress: Callable[[str], None] = lambda s: None) -> ComparisonResult:
    """The bundle vs its reference on PROMPTS; `long_prompt_tokens` adds a prompt of that many tokens, to
    reach positions beyond YaRN's original length or DCA's chunk period."""
    plan = Plan("validate", tuple(prompts), steps, (backend,), False, dict(overrides or {}), long_prompt_tokens)
    return run(model_dir, bundle_dir, plan, progress)


def table(result: ComparisonResult) -> str:
    """The terminal summary: per runner a row per prompt, its perplexity and its verdict."""
    out = []
    for b in result.backends:
        head = f"{'prompt':<34} {'tok':>4} {'prefill |d|':>11} {'decode |d|':>11} {'rel':>9} {'top1':>6} {'greedy':>7}"
        out += [f"[{b.backend}] {b.description}; tolerance row {b.tolerance_row}", head, "-" * len(head)]
        for p in b.prompts:
            rel = max([p["prefill"]["rel"]] + [s["rel"] for s in p["steps"]])
            decode = max(s["max_abs"] for s in p["steps"])
            out.append(f"{_cell(p['text'], 34)} {p['prompt_tokens']:>4} {p['prefill']['max_abs']:>11.2e} "
                       f"{decode:>11.2e} {rel:>9.2e} {p['top1']:>6.1%} {p['greedy_match']:>3}/{p['greedy_steps']:<3}")
        for q in b.perplexity:
            out.append(f"perplexity {q['id']}: {q['ppl']:.4g} vs reference {q['ppl_ref']:.4g} "
                       f"({q['ppl'] / q['ppl_ref'] - 1:+.2%})")
        out.append(f"[{b.backend}] {'PASS' if b.passed else 'FAIL: ' + '; '.join(b.failures)}")
        out.append("")
    for q in result.storage_cost:
        out.append(f"quantization cost on {q['id']}: perplexity {q['ppl_quantized']:.4g} with the bundle's weights vs "
                   f"{q['ppl_checkpoint']:.4g} with the checkpoint's (reference side, no runtime involved)")
    out += [f"note: {n}" for n in result.notes]
    out.append(f"long context: {result.bundle['long_context']}")
    out.append(f"reference: {result.reference['name']}; weights: {result.reference['weights']}")
    out.append(f"{result.preset}: {result.verdict}")
    return "\n".join(out)


def _cell(text: str, width: int) -> str:
    """`text` cut and padded to `width` terminal columns (CJK characters take two)."""
    out, used = "", 0
    for ch in text.replace("\n", " "):
        w = 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
        if used + w > width:
            break
        out, used = out + ch, used + w
    return out + " " * (width - used)

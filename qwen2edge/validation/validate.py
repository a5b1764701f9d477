"""`qwen2edge validate`: the bundle vs transformers on prefill logits, teacher-forced decode steps
and the greedy continuation, with per-dtype tolerances that fail (not warn)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError, ValidationError
from ..runtime.bundle import Bundle
from ..runtime.generator import Generator, decode_feed, prefill_feed
from ..runtime.sampling import SamplingParams
from .reference import HFReference

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "用一句话介绍一下你自己。",
)


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria for one export dtype."""

    max_abs: float
    min_top1: float
    require_greedy_match: bool
    max_ppl_increase: float | None = None  # relative, over prompt + reference continuation


# fp32: a wrong rotary table, mask or bias shows up as errors of 1e-1 or more; arithmetic order
# differences stay near 1e-5 relative. Half precisions are judged on agreement, not exact logits.
TOLERANCES = {
    "fp32": Tolerance(max_abs=2e-3, min_top1=1.0, require_greedy_match=True),
    "fp16": Tolerance(max_abs=0.5, min_top1=0.9, require_greedy_match=False),
    "bf16": Tolerance(max_abs=1.5, min_top1=0.85, require_greedy_match=False),
    # Weight-only quantization (keyed by scheme, activations fp32): judged on agreement and
    # perplexity, since per-logit error grows with the weight grid. Bounds set from the default
    # model's measured figures (docs/performance.md) with head-room for other checkpoints.
    "int8": Tolerance(max_abs=5.0, min_top1=0.9, require_greedy_match=False, max_ppl_increase=0.05),
    "int4": Tolerance(max_abs=30.0, min_top1=0.45, require_greedy_match=False, max_ppl_increase=0.25),
}


@dataclass
class PromptResult:
    prompt: str
    prompt_tokens: int
    prefill_max_abs: float
    prefill_max_rel: float
    decode_max_abs: float
    decode_max_rel: float
    top1_agreement: float
    greedy_match: int
    greedy_steps: int
    nll_ours: float = 0.0  # summed next-token negative log-likelihood over the teacher-forced sequence
    nll_ref: float = 0.0
    nll_tokens: int = 0


@dataclass
class ValidationReport:
    reference: str
    backend: str
    dtype: str
    steps: int
    tolerance: dict[str, Any]
    prompts: list[PromptResult] = field(default_factory=list)
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    long_context: str = "plain RoPE"
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max(max(p.prefill_max_abs, p.decode_max_abs) for p in self.prompts)

    @property
    def min_top1(self) -> float:
        return min(p.top1_agreement for p in self.prompts)

    @property
    def perplexity(self) -> tuple[float, float]:
        """(ours, reference) perplexity over every prompt's teacher-forced sequence."""
        n = sum(p.nll_tokens for p in self.prompts) or 1
        return (float(np.exp(sum(p.nll_ours for p in self.prompts) / n)),
                float(np.exp(sum(p.nll_ref for p in self.prompts) / n)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        ppl, ppl_ref = self.perplexity
        d.update(max_abs=self.max_abs, min_top1=self.min_top1, perplexity=ppl, perplexity_ref=ppl_ref,
                 mean_top1=float(np.mean([p.top1_agreement for p in self.prompts])))
        return d

    def table(self) -> str:
        head = f"{'prompt':<34} {'tok':>4} {'prefill |d|':>11} {'decode |d|':>11} {'rel':>9} {'top1':>6} {'greedy':>7}"
        rows = [head, "-" * len(head)]
        for p in self.prompts:
            rel = max(p.prefill_max_rel, p.decode_max_rel)
            rows.append(f"{_cell(p.prompt, 34)} {p.prompt_tokens:>4} {p.prefill_max_abs:>11.2e} {p.decode_max_abs:>11.2e} "
                        f"{rel:>9.2e} {p.top1_agreement:>6.1%} {p.greedy_match:>3}/{p.greedy_steps:<3}")
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        rows += [f"note: {n}" for n in self.notes]
        rows.append(f"long context: {self.long_context}")
        ppl, ppl_ref = self.perplexity
        rows.append(f"perplexity {ppl:.4g} vs reference {ppl_ref:.4g} ({ppl / ppl_ref - 1:+.2%})")
        rows.append(f"reference: {self.reference}; backend {self.backend}, {self.dtype}; {verdict}")
        return "\n".join(rows)


def _cell(text: str, width: int) -> str:
    """`text` cut and padded to `width` terminal columns (CJK characters take two)."""
    import unicodedata

    out, used = "", 0
    for ch in text:
        w = 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
        if used + w > width:
            break
        out, used = out + ch, used + w
    return out + " " * (width - used)


def _errors(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    diff = np.abs(ours.astype(np.float64) - ref)
    return float(diff.max()), float((diff / (np.abs(ref).max(axis=-1, keepdims=True) + 1e-6)).max())


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed -log softmax(logits)[target] (float64)."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
    return float((logz - x[np.arange(len(targets)), targets]).sum())


def teacher_forced(gen: Generator, prompt: list[int], forced: list[int]) -> np.ndarray:
    """Logits [len(prompt) + len(forced), V]: prefill every prompt position, then feed `forced` one by one
    (through the generator's steps, so mode-specific inputs such as DCA's position indices are added)."""
    max_seq_len = gen.max_seq_len
    cache = gen.backend.new_cache(1)
    feed = prefill_feed([prompt], max_seq_len, gen.pad_id)
    feed["logits_index"] = np.arange(len(prompt), dtype=np.int64)[None]
    rows = [gen.step(cache, feed, np.zeros(1, dtype=np.int64))[0]]
    length = np.array([len(prompt)], dtype=np.int64)
    for tok in forced:
        rows.append(gen.step(cache, decode_feed(np.array([tok]), length, max_seq_len), length)[0])
        length = length + 1
    return np.concatenate(rows, axis=0)


class _HFTarget:
    """transformers as the reference: greedy tokens and one full forward."""

    def __init__(self, model_dir):
        self.ref = HFReference(model_dir)
        self.name = "transformers Qwen2ForCausalLM fp32"

    def run(self, ids: list[int], steps: int, max_seq_len: int, pad_id: int) -> tuple[list[int], np.ndarray]:
        tokens = self.ref.greedy(ids, steps)
        return tokens, self.ref.logits(ids + tokens)[: len(ids) + steps]


class _TorchGraphTarget:
    """The project's eager PyTorch graph through the same DCA feeds (transformers has no DCA)."""

    def __init__(self, model_dir, bundle: Bundle):
        from ..exporter.export import io_spec_for
        from .torch_graph import REFERENCE_NAME, TorchGraphBackend

        spec = io_spec_for(bundle.config, bundle.max_seq_len, "fp32")
        self.gen = bundle.generator(TorchGraphBackend(model_dir, bundle.config, spec))
        self.name = REFERENCE_NAME

    def run(self, ids: list[int], steps: int, max_seq_len: int, pad_id: int) -> tuple[list[int], np.ndarray]:
        res, _ = self.gen.generate([ids], SamplingParams(max_new_tokens=steps, stop_token_ids=(-1,)))
        tokens = res[0].token_ids
        return tokens, teacher_forced(self.gen, ids, tokens)


def long_prompt(bundle: Bundle, n_tokens: int) -> list[int]:
    """A deterministic natural-text prompt of exactly n_tokens (the default prompts repeated)."""
    base: list[int] = []
    while len(base) < n_tokens:
        for text in DEFAULT_PROMPTS:
            base += bundle.tokenizer.encode(text + "\n")
    return base[:n_tokens]


def _long_context_threshold(bundle: Bundle) -> tuple[str, int | None]:
    """(summary, the position past which the long-context mode matters) for the report."""
    summary = bundle.manifest.long_context.summary
    cfg = bundle.config
    if cfg.dual_chunk is not None:
        return summary, cfg.dual_chunk.period
    if cfg.rope_scaling is not None:
        return summary, cfg.rope_scaling.original_max_position_embeddings or cfg.max_position_embeddings
    return "plain RoPE", None


def validate(model_dir: str | Path, bundle_dir: str | Path, steps: int = 32, backend: str = "ort",
             prompts: Sequence[str] = DEFAULT_PROMPTS, chat: bool = True, long_prompt_tokens: int = 0,
             progress: Callable[[str], None] = lambda s: None) -> ValidationReport:
    """Compare the bundle with its reference; the report's `passed` applies the dtype's tolerance.

    Reference: transformers (plain RoPE and YaRN), or for Dual Chunk Attention the project's eager
    PyTorch graph (see torch_graph.py). `long_prompt_tokens` adds a prompt of that many tokens, to
    reach positions beyond YaRN's original length or DCA's chunk period."""
    bundle = Bundle.open(bundle_dir)
    dtype = bundle.manifest.tolerance_key
    tol = TOLERANCES[dtype]
    gen = bundle.generator(backend)
    target = _TorchGraphTarget(model_dir, bundle) if bundle.spec.dca else _HFTarget(model_dir)
    summary, threshold = _long_context_threshold(bundle)
    report = ValidationReport(target.name, backend, dtype, steps, asdict(tol), long_context=summary)
    if bundle.spec.dca and bundle.config.rotary_dim != bundle.config.head_dim:
        report.notes.append("the PyTorch DCA reference is proven against the naive reference for full-width "
                            "rotary only; this model rotates part of each head")
    if long_prompt_tokens < 0 or long_prompt_tokens >= bundle.max_seq_len:
        raise InputError(f"{{opt:long_prompt_tokens}} {long_prompt_tokens} must be in 0..{bundle.max_seq_len - 1} "
                         "(below the bundle's max_seq_len): pass a smaller value")
    use_chat = chat and bundle.tokenizer.has_chat_template
    cases: list[tuple[str, list[int]]] = []
    for text in prompts:
        rendered = bundle.tokenizer.chat_prompt(text) if use_chat else text
        cases.append((text, bundle.tokenizer.encode(rendered)))
    if long_prompt_tokens:
        cases.append((f"<long prompt, {long_prompt_tokens} tokens>", long_prompt(bundle, long_prompt_tokens)))
    longest = 0
    for text, ids in cases:
        progress(f"validating: {text[:40]!r} ({len(ids)} tokens)")
        steps_here = min(steps, bundle.max_seq_len - len(ids))
        ref_tokens, ref_logits = target.run(ids, steps_here, bundle.max_seq_len, gen.pad_id)
        ref_logits = ref_logits.astype(np.float64)
        longest = max(longest, len(ids) + steps_here)
        ours = teacher_forced(gen, ids, ref_tokens)
        pre_abs, pre_rel = _errors(ours[: len(ids)], ref_logits[: len(ids)])
        dec_abs, dec_rel = _errors(ours[len(ids):], ref_logits[len(ids):])
        top1 = float((ours.argmax(-1) == ref_logits.argmax(-1)).mean())
        free, _ = gen.generate([ids], SamplingParams(max_new_tokens=steps_here, stop_token_ids=(-1,)))
        got = free[0].token_ids
        match = next((i for i, (a, b) in enumerate(zip(got, ref_tokens)) if a != b), min(len(got), len(ref_tokens)))
        seq = np.array(ids + ref_tokens[:steps_here])
        nll = (_nll(ours[:-1], seq[1:]), _nll(ref_logits[:-1], seq[1:]), len(seq) - 1)
        report.prompts.append(PromptResult(text, len(ids), pre_abs, pre_rel, dec_abs, dec_rel, top1, match, steps_here,
                                           *nll))
    for p in report.prompts:
        worst = max(p.prefill_max_abs, p.decode_max_abs)
        if worst > tol.max_abs:
            report.failures.append(f"max |delta logit| {worst:.3g} > {tol.max_abs:g} on {p.prompt[:20]!r}")
        if p.top1_agreement < tol.min_top1:
            report.failures.append(f"top-1 agreement {p.top1_agreement:.1%} < {tol.min_top1:.0%} on {p.prompt[:20]!r}")
        if tol.require_greedy_match and p.greedy_match < p.greedy_steps:
            report.failures.append(f"greedy diverges at token {p.greedy_match} on {p.prompt[:20]!r}")
    if threshold is not None and longest <= threshold:
        report.notes.append(f"no sequence went past position {threshold}, where the long-context mode starts to "
                            f"matter: add --long-prompt-tokens N (N > {threshold}) to cover it")
    ppl, ppl_ref = report.perplexity
    if tol.max_ppl_increase is not None and ppl > ppl_ref * (1 + tol.max_ppl_increase):
        report.failures.append(f"perplexity {ppl:.4g} is more than {tol.max_ppl_increase:.0%} above the "
                               f"reference's {ppl_ref:.4g}")
    report.passed = not report.failures
    return report


def require_pass(report: ValidationReport) -> None:
    """Raise ValidationError (non-zero exit) when the report failed."""
    if not report.passed:
        raise ValidationError(f"validation failed ({'; '.join(report.failures[:3])}): "
                               "inspect the table above; re-export in fp32 or report a qwen2edge bug")

"""The one accuracy engine behind `qwen2edge validate` (a quick preset) and `qwen2edge compare`.

For each prompt the reference (reference.py: the model the bundle claims to be) generates greedy
tokens; every runner is then fed those tokens teacher-forced (prefill of the prompt, one decode step
per token through its KV cache, so one early difference cannot cascade into every later step), and
generates free-running greedy for the match length. Perplexity texts are scored by both. The per-layer
drift compares hidden states of a debug export. Each runner is judged by its row of the tolerance
table (thresholds.py); the result (results.py) carries every check and the verdict.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..runtime.bundle import Bundle
from ..runtime.generator import Generator, decode_feed, prefill_feed
from ..runtime.sampling import SamplingParams
from . import metrics as M
from .backends import DESCRIPTIONS, GRAPH, backends_for, open_generator
from .layers import debug_bundle, layer_drift
from .prompts import Prompt
from .reference import Reference, check_checkpoint, load_reference, quantize
from .results import BackendResult, Check, ComparisonResult, LayerResult
from .storage import WeightQuantization
from .thresholds import CRITERIA, thresholds_for, tolerance_row

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """What to compare: `validate` and `compare` differ only in these settings."""

    preset: str
    prompts: tuple[Prompt, ...]
    steps: int = 32
    backends: tuple[str, ...] = ("ort",)
    layers: bool = True
    overrides: Mapping[str, float] = field(default_factory=dict)
    long_prompt_tokens: int = 0


@dataclass(frozen=True)
class Case:
    """One prompt as token ids."""

    id: str
    category: str
    kind: str  # "generate" | "perplexity"
    text: str
    ids: list[int]


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


def long_prompt(bundle: Bundle, n_tokens: int, texts: Sequence[str]) -> list[int]:
    """A deterministic natural-text prompt of exactly n_tokens (TEXTS repeated)."""
    base: list[int] = []
    while len(base) < n_tokens:
        for text in texts:
            base += bundle.tokenizer.encode(text + "\n")
    return base[:n_tokens]


def encode_cases(bundle: Bundle, plan: Plan) -> list[Case]:
    """Every prompt as token ids, refused up front (one line) when it cannot run in this bundle."""
    cases = []
    for p in plan.prompts:
        chat = p.kind == "generate" and p.chat and bundle.tokenizer.has_chat_template
        ids = bundle.tokenizer.encode(bundle.tokenizer.chat_prompt(p.text) if chat else p.text)
        if not ids:
            raise InputError(f"prompt {p.id!r} encodes to no tokens: give it some text")
        cases.append(Case(p.id, p.category, p.kind, p.text, ids))
    n = plan.long_prompt_tokens
    if n:
        if not 0 < n < bundle.max_seq_len:
            raise InputError(f"{{opt:long_prompt_tokens}} {n} must be in 1..{bundle.max_seq_len - 1} (below the "
                             "bundle's max_seq_len): pass a smaller value")
        texts = [p.text for p in plan.prompts if p.kind == "generate"]
        cases.append(Case("long-prompt", "long", "generate", f"<long prompt, {n} tokens>", long_prompt(bundle, n, texts)))
    for c in cases:
        if c.kind == "generate" and len(c.ids) >= bundle.max_seq_len:
            raise InputError(f"prompt {c.id!r} has {len(c.ids)} tokens, no room in the bundle's max_seq_len "
                             f"{bundle.max_seq_len}: shorten it or re-export with a larger {{opt:max_seq_len}}")
        if c.kind == "perplexity" and not 2 <= len(c.ids) <= bundle.max_seq_len:
            raise InputError(f"perplexity text {c.id!r} has {len(c.ids)} tokens; it needs 2..{bundle.max_seq_len} "
                             "(the bundle's max_seq_len): lengthen or shorten it")
    if not any(c.kind == "generate" for c in cases):
        raise InputError('no prompt to generate from: add at least one line without "kind": "perplexity"')
    return cases


class _ReferenceWork:
    """The reference's outputs for every case, computed once and shared by every runner."""

    def __init__(self, ref: Reference, cases: list[Case], steps: int, max_seq_len: int, progress: Progress):
        self.ref = ref
        self.generation: dict[str, tuple[list[int], np.ndarray]] = {}
        self.texts: dict[str, np.ndarray] = {}
        for c in cases:
            if c.kind == "generate":
                n = min(steps, max_seq_len - len(c.ids))
                progress(f"[reference] {c.id}: {len(c.ids)} tokens, {n} greedy steps")
                tokens = ref.greedy(c.ids, n)
                self.generation[c.id] = (tokens, ref.logits(c.ids + tokens, len(c.ids)).astype(np.float64))
            else:
                self.texts[c.id] = ref.logits(c.ids).astype(np.float64)

    def sequences(self, cases: list[Case]) -> list[list[int]]:
        return [c.ids + self.generation[c.id][0] for c in cases if c.id in self.generation]


def block_metrics(ref: np.ndarray, ours: np.ndarray) -> dict[str, float]:
    """Metrics of a block of rows taken together (a prompt's prefill logits)."""
    max_abs, mean_abs, cosine = M.block_errors(ref.astype(np.float32), ours.astype(np.float32))
    kl = M.kl_divergence(ref, ours)
    return {"max_abs": max_abs, "mean_abs": mean_abs, "rel": float(M.relative_error(ref, ours).max()),
            "cosine": cosine, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float(M.top1_agreement(ref, ours).mean()), "top5": float(M.topk_overlap(ref, ours, 5).mean())}


def _run_prompt(bundle: Bundle, gen: Generator, work: _ReferenceWork, c: Case, hist: M.ErrorHistogram) -> dict[str, Any]:
    ref_tokens, ref_logits = work.generation[c.id]
    n, t = len(ref_tokens), len(c.ids)
    ours = teacher_forced(gen, c.ids, ref_tokens)
    # Row t-1+k predicts generated token k: row t-1 comes from the prefill, the rest from decode steps.
    steps = [M.step_metrics(k, ref_logits[t - 1 + k], ours[t - 1 + k]).to_dict() for k in range(n)]
    hist.add(ref_logits[t - 1:t - 1 + n], ours[t - 1:t - 1 + n])
    free, _ = gen.generate([c.ids], SamplingParams(max_new_tokens=n, stop_token_ids=(-1,)))
    got = free[0].token_ids
    return {
        "id": c.id, "category": c.category, "text": c.text, "prompt_tokens": t,
        "prefill": block_metrics(ref_logits[:t], ours[:t]),
        "steps": steps,
        "top1": float(np.mean([s["top1"] for s in steps])),
        "greedy_match": M.greedy_match_length(ref_tokens, got), "greedy_steps": n,
        "reference_text": bundle.tokenizer.decode(ref_tokens), "backend_text": bundle.tokenizer.decode(got),
    }


def _run_text(gen: Generator, work: _ReferenceWork, c: Case) -> dict[str, Any]:
    ours = teacher_forced(gen, c.ids, [])  # logits at every position of the text, one prefill
    ppl_ref, ppl = M.perplexity(work.texts[c.id], c.ids), M.perplexity(ours, c.ids)
    return {"id": c.id, "category": c.category, "tokens": len(c.ids), "ppl_ref": ppl_ref, "ppl": ppl,
            "delta": ppl - ppl_ref, "delta_rel": abs(ppl - ppl_ref) / ppl_ref}


def summarize(prompts: list[dict[str, Any]], ppl: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates over all prompts of one runner (CRITERIA name the fields each bound checks)."""
    steps = [s for p in prompts for s in p["steps"]]
    cos = [s["cosine"] for s in steps] + [p["prefill"]["cosine"] for p in prompts]
    return {
        "max_abs": max(max(s["max_abs"] for s in steps), max(p["prefill"]["max_abs"] for p in prompts)),
        "mean_abs": float(np.mean([s["mean_abs"] for s in steps])),
        "max_rel": max(max(s["rel"] for s in steps), max(p["prefill"]["rel"] for p in prompts)),
        "min_cosine": min(cos),
        "mean_kl": float(np.mean([s["kl"] for s in steps])),
        "max_kl": max(s["kl"] for s in steps),
        "top1": float(np.mean([s["top1"] for s in steps])),
        "min_top1": min(p["top1"] for p in prompts),
        "top5": float(np.mean([s["top5"] for s in steps])),
        "min_greedy": min(p["greedy_match"] / p["greedy_steps"] for p in prompts),
        "greedy_match": sum(p["greedy_match"] for p in prompts), "greedy_steps": sum(p["greedy_steps"] for p in prompts),
        "max_ppl_delta": max((q["delta_rel"] for q in ppl), default=None),
        "steps_compared": len(steps),
    }


def _checks(summary: Mapping[str, Any], th: Mapping[str, float]) -> list[Check]:
    return [Check.of(k, summary[c.measure], th[k]) for k, c in CRITERIA.items() if k != "max_layer_rel"]


def _long_context_note(bundle: Bundle, cases: list[Case], work: _ReferenceWork) -> str | None:
    """A note when no sequence reached the positions where the bundle's long-context mode matters."""
    cfg = bundle.config
    if cfg.dual_chunk is not None:
        start = cfg.dual_chunk.period
    elif cfg.rope_scaling is not None:
        start = cfg.rope_scaling.original_max_position_embeddings or cfg.max_position_embeddings
    else:
        return None
    longest = max(len(s) for s in work.sequences(cases) + [c.ids for c in cases])
    if longest > start:
        return None
    return (f"no sequence went past position {start}, where the long-context mode starts to matter: add "
            f"--long-prompt-tokens N (N > {start}) to cover it")


def bundle_summary(bundle: Bundle) -> dict[str, Any]:
    """What kind of bundle this is, for the report."""
    m = bundle.manifest
    q = m.quantization
    return {"dtype": m.dtype, "quantization": q and {"scheme": q.scheme, "block_size": q.block_size,
                                                     "embeddings": q.embeddings},
            "long_context": m.long_context.summary, "long_context_overrides": dict(m.long_context.overrides),
            "debug_hidden_states": bool(bundle.spec.hidden_states),
            "external_data": m.model_file + ".data" in m.files, "max_seq_len": bundle.max_seq_len}


def run(model_dir: str | Path, bundle_dir: str | Path, plan: Plan, progress: Progress = lambda s: None) -> ComparisonResult:
    """Compare BUNDLE_DIR with the reference built from it and MODEL_DIR's weights. Never raises on a
    failing verdict (the caller decides: `require_pass`); bad input fails in one line before slow work."""
    if plan.steps < 1:
        raise InputError(f"{{opt:steps}} must be at least 1, got {plan.steps}")
    bundle = Bundle.open(bundle_dir)
    wq = WeightQuantization.from_record(bundle.manifest.quantization)
    kinds = backends_for(plan.backends, quantized=wq is not None)
    rows = {k: tolerance_row(bundle.manifest, k) for k in kinds}
    th = {k: thresholds_for(rows[k], plan.overrides) for k in kinds}
    check_checkpoint(model_dir, bundle)
    cases = encode_cases(bundle, plan)
    gens = {k: open_generator(bundle, k) for k in kinds}  # fail fast, before the reference
    progress(f"loading the reference from {model_dir}")
    ref = load_reference(model_dir, bundle)
    texts = [c for c in cases if c.kind == "perplexity"]
    storage_cost: list[dict[str, Any]] = []
    weights = "the checkpoint's"
    if wq is not None:
        before = {c.id: M.perplexity(ref.logits(c.ids), c.ids) for c in texts}
        quantize(ref, wq, bundle.config.tie_word_embeddings)
        weights = f"the checkpoint's, quantized as the bundle stores them: {wq.describe()}"
        storage_cost = [{"id": c.id, "tokens": len(c.ids), "ppl_checkpoint": before[c.id],
                         "ppl_quantized": M.perplexity(ref.logits(c.ids), c.ids)} for c in texts]
    work = _ReferenceWork(ref, cases, plan.steps, bundle.max_seq_len, progress)
    results = []
    for kind, gen in gens.items():
        hist = M.ErrorHistogram()
        prompts = []
        for c in (c for c in cases if c.kind == "generate"):
            progress(f"[{kind}] {c.id}: {len(work.generation[c.id][0])} teacher-forced steps + greedy")
            prompts.append(_run_prompt(bundle, gen, work, c, hist))
        ppl = [_run_text(gen, work, c) for c in texts]
        summary = summarize(prompts, ppl)
        results.append(BackendResult(kind, DESCRIPTIONS[kind], rows[kind], th[kind], prompts, ppl, hist.to_dict(),
                                     summary, _checks(summary, th[kind])))
    layers = _layers(bundle, model_dir, work, cases, gens, wq, plan.overrides, progress) if plan.layers else None
    notes = [n for n in [_long_context_note(bundle, cases, work)] if n]
    if plan.layers and layers is None:
        notes.append("per-layer drift skipped: ONNX Runtime CPU cannot run bf16 graphs")
    return ComparisonResult(
        preset=plan.preset, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        reference={"name": ref.name, "kind": ref.kind, "weights": weights},
        model_dir=str(Path(model_dir).absolute()), bundle_dir=str(Path(bundle_dir).absolute()),
        bundle=bundle_summary(bundle),
        model={"layers": bundle.config.num_hidden_layers, "hidden_size": bundle.config.hidden_size,
               "vocab_size": bundle.config.vocab_size},
        steps=plan.steps, prompts=[p.to_dict() for p in plan.prompts], threshold_overrides=dict(plan.overrides),
        backends=results, layers=layers, storage_cost=storage_cost, notes=notes)


def _layers(bundle: Bundle, model_dir, work: _ReferenceWork, cases: list[Case], gens: dict[str, Generator],
            wq: WeightQuantization | None, overrides: Mapping[str, float], progress: Progress) -> LayerResult | None:
    """Hidden-state drift on the runner that judges the export: ort-graph for quantized bundles, else ort."""
    if bundle.spec.kv_dtype == "bfloat16":
        return None
    kind = GRAPH if wq is not None else "ort"
    row = tolerance_row(bundle.manifest, kind)
    bound = thresholds_for(row, overrides)["max_layer_rel"]
    sequences = work.sequences(cases)
    progress(f"per-layer drift on {len(sequences)} sequences")
    tmp = Path(tempfile.mkdtemp(prefix="qwen2edge-compare-"))
    try:
        dbg, source = debug_bundle(bundle, model_dir, tmp, progress)
        gen = gens[kind] if dbg is bundle and kind in gens else open_generator(dbg, kind)
        out = layer_drift(work.ref, gen.backend, sequences, gen.pad_id, bound, gen.extra_feed, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    worst = max(r["rel_l2"] for r in out["rows"])
    return LayerResult(source, kind, row, out["rows"], out["first_over"], out["first_over_name"], out["largest_jump"],
                       out["largest_jump_name"], Check.of("max_layer_rel", worst, bound))

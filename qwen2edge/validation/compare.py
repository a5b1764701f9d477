"""`qwen2edge compare`: transformers fp32 vs each backend of one bundle, per step and per layer.

Every backend is run teacher-forced on the reference's greedy tokens (one early difference cannot
cascade into every later step), then free-running greedy for the match length; perplexity texts are
scored by both. The result is one JSON-ready dict (schema in report.py) with a pass/fail verdict.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .. import __version__
from ..errors import InferenceError, InputError, Qwen2EdgeError
from ..runtime.backend import Backend
from ..runtime.bundle import BACKENDS, Bundle
from ..runtime.generator import Generator
from ..runtime.sampling import SamplingParams
from . import metrics as M
from .layers import debug_runner, layer_drift
from .prompts import BUILTIN, Prompt
from .reference import HFReference
from .thresholds import DESCRIPTIONS, thresholds_for
from .validate import teacher_forced

SCHEMA = "qwen2edge.compare"
SCHEMA_VERSION = 1
REFERENCE = "transformers Qwen2ForCausalLM fp32 (CPU)"

Progress = Callable[[str], None]


def open_backend(bundle: Bundle, kind: str) -> Backend:
    """bundle.backend(kind), with a one-line error when its library (e.g. TensorRT) is absent."""
    if kind not in BACKENDS:
        raise InputError(f"unknown backend {kind!r}: pass --backend {' or '.join(BACKENDS)}")
    try:
        return bundle.backend(kind)
    except Qwen2EdgeError:
        raise
    except ImportError as exc:
        lib = "TensorRT" if kind == "trt" else "ONNX Runtime"
        raise InferenceError(f"--backend {kind} needs {lib}, which is not usable here ({exc}): install the "
                             f"`tensorrt` extra on an NVIDIA GPU machine, or drop --backend {kind}") from None


def block_metrics(ref: np.ndarray, ours: np.ndarray) -> dict[str, float]:
    """Metrics of a block of rows taken together (a prompt's prefill logits)."""
    max_abs, mean_abs, cosine = M.polygraphy_errors(ref.astype(np.float32), ours.astype(np.float32))
    kl = M.kl_divergence(ref, ours)
    return {"max_abs": max_abs, "mean_abs": mean_abs, "rel": float(M.relative_error(ref, ours).max()),
            "cosine": cosine, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float(M.top1_agreement(ref, ours).mean()), "top5": float(M.topk_overlap(ref, ours, 5).mean())}


class _RefCache:
    """Reference work done once per prompt and shared by every backend."""

    def __init__(self, ref: HFReference):
        self.ref = ref
        self.greedy: dict[str, tuple[list[int], list[int], np.ndarray]] = {}
        self.ppl: dict[str, tuple[list[int], np.ndarray]] = {}

    def generation(self, p: Prompt, ids: list[int], steps: int) -> tuple[list[int], list[int], np.ndarray]:
        if p.id not in self.greedy:
            tokens = self.ref.greedy(ids, steps)
            self.greedy[p.id] = (ids, tokens, self.ref.logits(ids + tokens).astype(np.float64))
        return self.greedy[p.id]

    def text(self, p: Prompt, ids: list[int]) -> tuple[list[int], np.ndarray]:
        if p.id not in self.ppl:
            self.ppl[p.id] = (ids, self.ref.logits(ids).astype(np.float64))
        return self.ppl[p.id]


def _encode(bundle: Bundle, p: Prompt) -> list[int]:
    chat = p.kind == "generate" and p.chat and bundle.tokenizer.has_chat_template
    ids = bundle.tokenizer.encode(bundle.tokenizer.chat_prompt(p.text) if chat else p.text)
    if not ids:
        raise InputError(f"prompt {p.id!r} encodes to no tokens: give it some text")
    return ids


def _run_prompt(bundle: Bundle, gen: Generator, refs: _RefCache, p: Prompt, steps: int,
                hist: M.ErrorHistogram) -> dict[str, Any]:
    ids = _encode(bundle, p)
    n = min(steps, bundle.max_seq_len - len(ids))
    if n < 1:
        raise InputError(f"prompt {p.id!r} has {len(ids)} tokens, no room in the bundle's max_seq_len "
                         f"{bundle.max_seq_len}: shorten it or re-export with a larger --max-seq-len")
    ids, ref_tokens, ref_logits = refs.generation(p, ids, n)
    ours = teacher_forced(gen, ids, ref_tokens)
    t = len(ids)
    # Row t-1+k predicts generated token k: row t-1 comes from the prefill, the rest from decode steps.
    steps_m = [M.step_metrics(k, ref_logits[t - 1 + k], ours[t - 1 + k]).to_dict() for k in range(n)]
    hist.add(ref_logits[t - 1:t - 1 + n], ours[t - 1:t - 1 + n])
    free, _ = gen.generate([ids], SamplingParams(max_new_tokens=n, stop_token_ids=(-1,)))
    got = free[0].token_ids
    return {
        "id": p.id, "category": p.category, "text": p.text, "prompt_tokens": t,
        "prefill": block_metrics(ref_logits[:t], ours[:t]),
        "steps": steps_m,
        "top1": float(np.mean([s["top1"] for s in steps_m])),
        "greedy_match": M.greedy_match_length(ref_tokens, got), "greedy_steps": n,
        "reference_text": bundle.tokenizer.decode(ref_tokens), "backend_text": bundle.tokenizer.decode(got),
    }


def _run_ppl(bundle: Bundle, gen: Generator, refs: _RefCache, p: Prompt) -> dict[str, Any]:
    ids = _encode(bundle, p)
    if len(ids) > bundle.max_seq_len:
        raise InputError(f"perplexity text {p.id!r} has {len(ids)} tokens, over the bundle's max_seq_len "
                         f"{bundle.max_seq_len}: shorten it")
    ids, ref_logits = refs.text(p, ids)
    ours = teacher_forced(gen, ids, [])  # logits at every position of the text
    ppl_ref, ppl = M.perplexity(ref_logits, ids), M.perplexity(ours, ids)
    return {"id": p.id, "category": p.category, "tokens": len(ids), "ppl_ref": ppl_ref, "ppl": ppl,
            "delta": ppl - ppl_ref, "delta_rel": abs(ppl - ppl_ref) / ppl_ref}


def summarize(prompts: list[dict[str, Any]], ppl: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregates over all prompts of one backend (names match the threshold keys they are checked by)."""
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


def check(summary: Mapping[str, Any], layers: Mapping[str, Any] | None, th: Mapping[str, float]) -> list[str]:
    """Human-readable failures of one backend against the thresholds."""
    measured = {"max_abs": summary["max_abs"], "min_cosine": summary["min_cosine"],
                "max_mean_kl": summary["mean_kl"], "min_top1": summary["min_top1"], "min_top5": summary["top5"],
                "min_greedy": summary["min_greedy"], "max_ppl_delta": summary["max_ppl_delta"],
                "max_layer_rel": max(r["rel_l2"] for r in layers["rows"]) if layers else None}
    out = []
    for key, value in measured.items():
        if value is None:
            continue
        bad = value > th[key] if key.startswith("max_") else value < th[key]
        if bad or not np.isfinite(value):
            op = ">" if key.startswith("max_") else "<"
            out.append(f"{key} {value:.4g} {op} {th[key]:g} ({DESCRIPTIONS[key]})")
    if layers and layers.get("first_over") is not None:
        out.append(f"error enters at {layers['first_over_name']} (first hidden state over {th['max_layer_rel']:g})")
    return out


def compare(model_dir: str | Path, bundle_dir: str | Path, backends: Sequence[str] = ("ort",),
            prompts: Sequence[Prompt] = BUILTIN, steps: int = 32, overrides: Mapping[str, float] | None = None,
            layers: bool = True, progress: Progress = lambda s: None) -> dict[str, Any]:
    """Run the comparison; returns the report dict (see docs/compare.md). Never raises on a failing
    verdict: the caller decides (`require_pass`)."""
    if steps < 1:
        raise InputError(f"--steps must be at least 1, got {steps}")
    backends = list(dict.fromkeys(backends)) or ["ort"]
    gen_prompts = [p for p in prompts if p.kind == "generate"]
    ppl_prompts = [p for p in prompts if p.kind == "perplexity"]
    if not gen_prompts:
        raise InputError('no prompt to generate from: add at least one line without "kind": "perplexity"')
    bundle = Bundle.open(bundle_dir)
    dtype = bundle.manifest.dtype
    th = thresholds_for(bundle.manifest.tolerance_key, overrides)
    runners = {kind: open_backend(bundle, kind) for kind in backends}  # fail fast, before the slow reference
    progress(f"loading the reference ({REFERENCE}) from {model_dir}")
    refs = _RefCache(HFReference(model_dir))
    results = []
    for kind, runner in runners.items():
        gen = bundle.generator(runner)
        hist = M.ErrorHistogram()
        rows = []
        for i, p in enumerate(gen_prompts, 1):
            progress(f"[{kind}] prompt {i}/{len(gen_prompts)} {p.id}: {steps} teacher-forced steps + greedy")
            rows.append(_run_prompt(bundle, gen, refs, p, steps, hist))
        ppl = []
        for i, p in enumerate(ppl_prompts, 1):
            progress(f"[{kind}] perplexity text {i}/{len(ppl_prompts)} {p.id}")
            ppl.append(_run_ppl(bundle, gen, refs, p))
        results.append({"backend": kind, "prompts": rows, "perplexity": ppl, "histogram": hist.to_dict(),
                        "summary": summarize(rows, ppl)})
    layer_report = None
    if layers:
        layer_report = _layers(bundle, model_dir, refs, runners.get("ort"), th["max_layer_rel"], progress)
    for r in results:
        # Hidden states come from ONNX Runtime; they judge the export, so they count for every backend.
        r["failures"] = check(r["summary"], layer_report, th)
        r["passed"] = not r["failures"]
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "qwen2edge_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reference": REFERENCE, "model_dir": str(Path(model_dir).absolute()),
        "bundle_dir": str(Path(bundle_dir).absolute()), "dtype": dtype,
        "model": {"layers": bundle.config.num_hidden_layers, "hidden_size": bundle.config.hidden_size,
                  "vocab_size": bundle.config.vocab_size},
        "steps": steps, "prompts": [p.to_dict() for p in prompts],
        "thresholds": th, "threshold_overrides": dict(overrides or {}),
        "backends": results, "layers": layer_report,
        "passed": all(r["passed"] for r in results),
    }


def _layers(bundle: Bundle, model_dir, refs: _RefCache, ort_runner, max_rel: float,
            progress: Progress) -> dict[str, Any] | None:
    if bundle.spec.kv_dtype == "bfloat16":
        progress("per-layer drift skipped: ONNX Runtime CPU cannot run bf16 graphs")
        return None
    sequences = [ids + toks for ids, toks, _ in refs.greedy.values()]
    progress(f"per-layer drift on {len(sequences)} sequences")
    work = Path(tempfile.mkdtemp(prefix="qwen2edge-compare-"))
    try:
        runner, source = debug_runner(bundle, model_dir, ort_runner, work, progress)
        out = layer_drift(refs.ref, runner, sequences, 0, max_rel, progress)  # one sequence a prefill: no padding
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"source": source, "backend": "ort", **out}


def compare_to_report(model_dir: str | Path, bundle_dir: str | Path, backends: Sequence[str] = ("ort",),
                      prompts_file: str | None = None, steps: int = 32, report_dir: str | Path | None = None,
                      thresholds: Sequence[str] = (), layers: bool = True,
                      progress: Callable[[str], None] = lambda s: None) -> tuple[dict[str, Any], Path]:
    """`qwen2edge compare`: run the comparison and write report.json/.md/.html; returns (report, report dir)."""
    from .prompts import BUILTIN, load_prompts
    from .report import write_report
    from .thresholds import parse_overrides

    overrides = parse_overrides(thresholds)
    prompts = load_prompts(prompts_file) if prompts_file else BUILTIN
    out = Path(report_dir) if report_dir else Path.cwd() / f"compare-{Path(bundle_dir).absolute().name}"
    report = compare(model_dir, bundle_dir, backends=backends or ("ort",), prompts=prompts, steps=steps,
                     overrides=overrides, layers=layers, progress=progress)
    write_report(report, out)
    progress(f"report: {out / 'report.html'} (also report.md, report.json)")
    return report, out

"""Decode speed of the default model with and without a json_schema constraint (llguidance, per-row masks).

For each setting the constrained run goes first and its token count sets the plain run's length (the plain
run never stops early), so both decode the same number of steps over the same cache lengths; runs are
interleaved and each figure is a median over --repeats. The grammar engine's one-time build (per
tokenizer, per server) is timed apart, and so is the grammar's own work per token (mask + advance,
replayed over the greedy output), next to a decode step: on a busy machine that split says more than
the end-to-end ratio. Prints tables; no torch needed. Usage:
    python benchmarks/structured_decode.py [--bundle DIR] [--max-tokens 320] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # qwen2edge from this checkout

SCHEMA = {
    "type": "object",
    "properties": {
        "books": {"type": "array", "minItems": 3, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"title": {"type": "string", "maxLength": 80}, "author": {"type": "string", "maxLength": 60},
                           "year": {"type": "integer", "minimum": 1000, "maximum": 2030},
                           "summary": {"type": "string", "maxLength": 100}},
            "required": ["title", "author", "year", "summary"], "additionalProperties": False}},
    },
    "required": ["books"],
    "additionalProperties": False,
}
ASK = ("List three classic novels as JSON: an object with a 'books' array; each book has title, author, year and a "
       "two-sentence summary.")
SETTINGS = (("greedy, 1 row", 1, {}), ("T=0.7 seed, 1 row", 1, {"temperature": 0.7, "seed": 1}),
            ("greedy, 4 rows", 4, {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None, help="bundle dir (default: the demo's fp32 default model)")
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from qwen2edge.runtime.bundle import Bundle
    from qwen2edge.runtime.constrain import Grammar
    from qwen2edge.runtime.sampling import SamplingParams

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    bundle_dir = args.bundle or _default_bundle(log)
    bundle = Bundle.open(bundle_dir)
    gen = bundle.generator()
    ids = bundle.tokenizer.encode(bundle.tokenizer.chat_prompt(ASK))
    t0 = time.perf_counter()
    gen.grammar_engine()
    build_s = time.perf_counter() - t0
    grammar = Grammar.json_schema(SCHEMA)

    def run(rows: int, extra: dict, constrained: bool, n: int) -> tuple[float, int, list[int], str]:
        kw = dict(max_new_tokens=n, **extra)
        params = SamplingParams(grammar=grammar, **kw) if constrained else SamplingParams(stop_token_ids=(-1,), **kw)
        results, t = gen.generate([ids] * rows, [params] * rows)
        first = results[0]
        return t.decode_tokens_per_s * rows, min(len(r.token_ids) for r in results), first.token_ids, first.text

    table, greedy_ids, step_ms = [], [], []
    for name, rows, extra in SETTINGS:
        steps = run(rows, extra, True, args.max_tokens)[1]  # also the warm-up
        plain, constrained, valid = [], [], True
        for i in range(args.repeats):
            log(f"{name}: run {i + 1}/{args.repeats}")
            rate, _, tokens, text = run(rows, extra, True, args.max_tokens)
            constrained.append(rate)
            greedy_ids = greedy_ids or tokens  # the first setting is greedy, one row
            valid &= _parses(text)
            plain.append(run(rows, extra, False, steps)[0])
        table.append((name, steps, statistics.median(plain), statistics.median(constrained), valid))
        step_ms = step_ms or [1000 / rate for rate in plain]
    grammar_ms = _grammar_work(gen, grammar, greedy_ids, bundle.config.vocab_size)

    load = os.getloadavg()[0]
    print(f"{bundle_dir.name}: prompt {len(ids)} tokens, json_schema (3 books), {os.cpu_count()} cores, "
          f"load avg {load:.1f}, median of {args.repeats}; grammar engine build (once) {build_s:.2f} s")
    print(f"{'setting':<20} {'steps':>6} {'plain tok/s':>12} {'json_schema tok/s':>18} {'ratio':>6} {'valid':>6}")
    for name, steps, plain, constrained, valid in table:
        print(f"{name:<20} {steps:>6} {plain:>12.1f} {constrained:>18.1f} {constrained / plain:>6.3f} "
              f"{'yes' if valid else 'NO':>6}")
    g50, g95, step = statistics.median(grammar_ms), _p95(grammar_ms), statistics.median(step_ms)
    print(f"grammar work per token (mask + advance, {len(grammar_ms)} tokens of the greedy output): median "
          f"{g50:.3f} ms, p95 {g95:.3f} ms; plain decode step {step:.1f} ms -> {100 * g50 / step:.1f}% of a step")
    if load > (os.cpu_count() or 1) * 0.5:
        print("warning: the machine was busy during the run; figures are noisy", file=sys.stderr)


def _grammar_work(gen, grammar, tokens: list[int], vocab: int) -> list[float]:
    """Milliseconds of grammar work per token (what a constrained row adds to a step), replayed."""
    import numpy as np

    constraint = gen.grammar_engine().constraint(grammar)
    logits = np.zeros((1, vocab), dtype=np.float32)
    out = []
    for tok in tokens:
        t0 = time.perf_counter()
        constraint.mask(logits)
        constraint.consume(tok)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _p95(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.95 * len(xs)))]


def _parses(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _default_bundle(log) -> Path:
    from qwen2edge.demo import cached_bundle
    from qwen2edge.exporter.gguf_convert import default_model_dir, ensure_default_model

    model_dir = ensure_default_model(progress=log)
    return cached_bundle(model_dir, default_model_dir().parent / "smollm2-135m-instruct-onnx-fp32", log)


if __name__ == "__main__":
    main()

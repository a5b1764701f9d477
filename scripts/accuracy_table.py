"""Accuracy of every bundle kind: `validate` and `compare` verdicts, max |delta logit| and top-1.

Tiny random Qwen2 models (tests/tiny_models.py) exported as every kind the exporter makes
(tests/validation/kinds.py), each also from a copy of its checkpoint with one MLP weight scaled by
1.05 and validated against the original (those rows must FAIL); then the default model
(SmolLM2-135M-Instruct) as fp32, int8 and int4 bundles. Each row runs exactly what the commands run
(validate's preset, compare's built-in prompts with per-layer drift). The figures are compare's, for
ONNX Runtime as `generate` runs it; for quantized bundles the last column is `ort-graph` (the graph's
own arithmetic, which judges the export). Needs the `export` and `dev` extras; progress on stderr.

  python scripts/accuracy_table.py                      # tiny kinds, then the default model
  python scripts/accuracy_table.py --no-default-model   # tiny kinds only (about a minute a kind)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def row(model: str, kind: str, model_dir: Path, bundle: Path, steps: int, long_prompt: int) -> str:
    from qwen2edge.validation.compare import compare
    from qwen2edge.validation.validate import validate

    log(f"{model} {kind}: validate")
    v = validate(model_dir, bundle, steps=steps, long_prompt_tokens=long_prompt)
    log(f"{model} {kind}: compare")
    c = compare(model_dir, bundle, steps=steps, long_prompt_tokens=long_prompt)
    s = c.backend("ort").summary
    graph = next((b.summary["max_abs"] for b in c.backends if b.backend == "ort-graph"), None)
    return (f"| {model} | {kind} | {c.reference['kind']} | {v.verdict} | {c.verdict} | {s['max_abs']:.3g} | "
            f"{s['top1']:.1%} | {'-' if graph is None else format(graph, '.3g')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="teacher-forced steps per prompt (both commands)")
    ap.add_argument("--default-steps", type=int, default=16, help="the same for the default model")
    ap.add_argument("--no-default-model", action="store_true")
    ap.add_argument("--work-dir", type=Path, default=None, help="where models and bundles go (default: a temp dir)")
    args = ap.parse_args()
    from tests.tiny_models import LONG_CONTEXT_VARIANTS, TINY_VARIANTS, make_tiny_qwen2
    from tests.validation.kinds import KINDS, LAYOUT_KINDS, LONG_PROMPT, export_kind, scale_one_weight

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="accuracy-table-"))
    print(f"steps per prompt: tiny {args.steps}, default model {args.default_steps}; max |delta logit| and top-1 "
          "from compare on ONNX Runtime (ort); ort-graph: the quantized graph's own arithmetic")
    print("| model | bundle kind | reference | validate | compare | max abs delta logit | top-1 | ort-graph max abs |")
    print("|---|---|---|---|---|---:|---:|---:|", flush=True)
    presets = {**TINY_VARIANTS, **LONG_CONTEXT_VARIANTS}
    for kind, (name, _) in {**KINDS, **LAYOUT_KINDS}.items():
        model = work / "models" / name
        if not model.exists():
            make_tiny_qwen2(model, **presets[name])
        variants = [(kind, model)]
        if kind in KINDS:
            broken = work / "models" / f"{name}-broken"
            if not broken.exists():
                scale_one_weight(model, broken)
            variants.append((f"{kind}, 1.05 weight", broken))
        for label, src in variants:
            log(f"tiny {label}: export")
            bundle = export_kind(src, kind, work / "bundles" / label.replace(", ", "-").replace(" ", "_"), 96)
            print(row("tiny", label, model, bundle, args.steps, LONG_PROMPT.get(kind, 0)), flush=True)
    if not args.no_default_model:
        from qwen2edge.exporter.export import ExportOptions, export_bundle
        from qwen2edge.exporter.gguf_convert import ensure_default_model
        from qwen2edge.exporter.quantize import QuantizeOptions

        model = ensure_default_model(progress=log)
        for kind, quant in (("fp32", None), ("int8", QuantizeOptions("int8", 32, True)),
                            ("int4", QuantizeOptions("int4", 32, True))):
            log(f"default model {kind}: export")
            bundle = work / "bundles" / f"default-{kind}"
            export_bundle(model, bundle, ExportOptions(max_seq_len=512, trt_check=None, quantize=quant))
            print(row("SmolLM2-135M", kind, model, bundle, args.default_steps, 0), flush=True)


if __name__ == "__main__":
    main()

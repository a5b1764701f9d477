"""`qwen2edge compare`: the full preset of the accuracy engine (engine.py), written as a report:
every built-in prompt category, perplexity texts, per-layer drift, report.json/.md/.html."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..manifest import prepare_output
from .engine import Plan, run
from .prompts import BUILTIN, Prompt
from .results import ComparisonResult


def compare(model_dir: str | Path, bundle_dir: str | Path, backends: Sequence[str] = ("ort",),
            prompts: Sequence[Prompt] = BUILTIN, steps: int = 32, overrides: Mapping[str, float] | None = None,
            layers: bool = True, long_prompt_tokens: int = 0,
            progress: Callable[[str], None] = lambda s: None) -> ComparisonResult:
    """Run the comparison (see docs/compare.md); never raises on a failing verdict (`require_pass` does)."""
    plan = Plan("compare", tuple(prompts), steps, tuple(backends), layers, dict(overrides or {}), long_prompt_tokens)
    return run(model_dir, bundle_dir, plan, progress)


def compare_to_report(model_dir: str | Path, bundle_dir: str | Path, backends: Sequence[str] = ("ort",),
                      prompts_file: str | None = None, steps: int = 32, report_dir: str | Path | None = None,
                      thresholds: Sequence[str] = (), layers: bool = True, long_prompt_tokens: int = 0,
                      progress: Callable[[str], None] = lambda s: None,
                      overwrite: bool = False) -> tuple[ComparisonResult, Path]:
    """`qwen2edge compare`: run the comparison and write report.json/.md/.html; returns (result, report dir)."""
    from .prompts import load_prompts
    from .report import REPORT_KIND, write_report
    from .thresholds import parse_overrides

    overrides = parse_overrides(thresholds)
    prompts = load_prompts(prompts_file) if prompts_file else BUILTIN
    out = Path(report_dir) if report_dir else Path.cwd() / f"compare-{Path(bundle_dir).absolute().name}"
    inputs = [p for p in (model_dir, bundle_dir, prompts_file) if p]
    prepare_output(out, overwrite, inputs, option="report", progress=progress, kind=REPORT_KIND)  # before comparing
    result = compare(model_dir, bundle_dir, backends=backends or ("ort",), prompts=prompts, steps=steps,
                     overrides=overrides, layers=layers, long_prompt_tokens=long_prompt_tokens, progress=progress)
    write_report(result.to_dict(), out, overwrite)
    progress(f"report: {out / 'report.html'} (also report.md, report.json)")
    return result, out

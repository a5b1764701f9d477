"""Write a compare report: report.json (versioned schema), report.md and report.html, atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..manifest import atomic_directory, write_json_atomic, write_manifest
from .report_html import bundle_kind, render_html

REPORT_KIND = "compare-report"


def _f(x: float | None, fmt: str = ".2e") -> str:
    return "n/a" if x is None else format(x, fmt)


def summary_table(report: dict[str, Any]) -> str:
    """One markdown row per backend: the aggregates the verdict is based on."""
    head = ("| backend | dtype | row | max abs | mean abs | max rel | min cos | mean KL | top-1 | top-5 | greedy | "
            "ppl delta | worst layer rel | verdict |")
    rows = [head, "|---|---|---|" + "---:|" * 10 + "---|"]
    layer = report.get("layers")
    for b in report["backends"]:
        s = b["summary"]
        worst = max(r["rel_l2"] for r in layer["rows"]) if layer and layer["backend"] == b["backend"] else None
        rows.append(
            f"| {b['backend']} | {report['dtype']} | {b['tolerance_row']} | {_f(s['max_abs'])} | {_f(s['mean_abs'])} | "
            f"{_f(s['max_rel'])} | {s['min_cosine']:.6f} | {_f(s['mean_kl'])} | {s['top1']:.1%} | {s['top5']:.1%} | "
            f"{s['greedy_match']}/{s['greedy_steps']} | {_f(s['max_ppl_delta'])} | {_f(worst)} | "
            f"{'PASS' if b['passed'] else 'FAIL'} |")
    return "\n".join(rows)


def layer_table(report: dict[str, Any]) -> str:
    layer = report["layers"]
    rows = ["| hidden state | max abs | mean abs | rel L2 | cosine |", "|---|---:|---:|---:|---:|"]
    for r in layer["rows"]:
        mark = " **<- error enters**" if r["index"] == layer["first_over"] else ""
        rows.append(f"| {r['name']}{mark} | {r['max_abs']:.2e} | {r['mean_abs']:.2e} | {r['rel_l2']:.2e} | "
                    f"{r['cosine']:.6f} |")
    return "\n".join(rows)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: verdict, summary, failures, per-prompt, perplexity and per-layer tables."""
    ref = report["reference"]
    out = [f"# qwen2edge {report['preset']}: {report['verdict']}", "",
           f"- reference: {ref['name']}; weights: {ref['weights']}", f"- model: `{report['model_dir']}`",
           f"- bundle: `{report['bundle_dir']}` ({bundle_kind(report)})",
           f"- {report['steps']} teacher-forced steps per prompt; created {report['created']}; "
           f"schema {report['schema']}/{report['schema_version']}", ""]
    out += [f"- note: {n}" for n in report["notes"]]
    out += ["", "## Summary", "", summary_table(report), ""]
    for b in report["backends"]:
        if b["failures"]:
            out += [f"### {b['backend']} failures", ""] + [f"- {f}" for f in b["failures"]] + [""]
    if report.get("layers") and report["layers"]["failures"]:
        out += ["### per-layer drift failures", ""] + [f"- {f}" for f in report["layers"]["failures"]] + [""]
    out += ["## Thresholds", "", "| backend | row | key | must be | bound |", "|---|---|---|---|---:|"]
    out += [f"| {b['backend']} | {b['tolerance_row']} | {c['key']}{' (override)' if c['key'] in report['threshold_overrides'] else ''} "
            f"| {c['passes_when']} | {c['bound']:g} |" for b in report["backends"] for c in b["checks"]]
    if report["storage_cost"]:
        out += ["", "## Quantization cost (reference side)", "",
                "Perplexity of the reference with the checkpoint's weights and with the bundle's quantized weights "
                "(no runtime involved).", "", "| text | tokens | ppl checkpoint | ppl quantized |", "|---|---:|---:|---:|"]
        out += [f"| {q['id']} | {q['tokens']} | {q['ppl_checkpoint']:.4f} | {q['ppl_quantized']:.4f} |"
                for q in report["storage_cost"]]
    for b in report["backends"]:
        out += ["", f"## {b['backend']}: per prompt", "",
                "| prompt | category | tokens | prefill max abs | steps max abs | min cos | mean KL | top-1 | greedy |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for p in b["prompts"]:
            st = p["steps"]
            out.append(f"| {p['id']} | {p['category']} | {p['prompt_tokens']} | {p['prefill']['max_abs']:.2e} | "
                       f"{max(s['max_abs'] for s in st):.2e} | {min(s['cosine'] for s in st):.6f} | "
                       f"{sum(s['kl'] for s in st) / len(st):.2e} | {p['top1']:.1%} | "
                       f"{p['greedy_match']}/{p['greedy_steps']} |")
        if b["perplexity"]:
            out += ["", f"## {b['backend']}: perplexity", "", "| text | category | tokens | ppl ref | ppl | delta |",
                    "|---|---|---:|---:|---:|---:|"]
            out += [f"| {q['id']} | {q['category']} | {q['tokens']} | {q['ppl_ref']:.4f} | {q['ppl']:.4f} | "
                    f"{q['delta']:+.2e} |" for q in b["perplexity"]]
    if report.get("layers"):
        lay = report["layers"]
        out += ["", "## Per-layer drift", "",
                f"Hidden states from the {lay['source']} on {lay['backend']} vs the reference's, "
                "worst over the prompts' teacher-forced sequences. "
                f"Largest increase in relative drift: **{lay['largest_jump_name']}**"
                + (f"; first over {lay['threshold']:g}: **{lay['first_over_name']}**." if lay["first_over"] is not None
                   else f"; none over {lay['threshold']:g}."), "", layer_table(report)]
    return "\n".join(out) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write report.json, report.md, report.html and a manifest.json with their checksums into OUT_DIR
    (replaced as a whole: only a new or empty directory, or an earlier report with `overwrite`)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite, option="report", kind=REPORT_KIND) as tmp:
        write_json_atomic(tmp / "report.json", report)
        (tmp / "report.md").write_text(render_markdown(report), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(report), encoding="utf-8")
        write_manifest(tmp, {"kind": REPORT_KIND})
    return out_dir

"""report.html: one self-contained page (inline CSS and SVG, no scripts, no network) with the plots."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from .svg import bar_chart, line_chart

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1000px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child,td:last-child{text-align:left}.pass{color:#1a7f37;font-weight:bold}.fail{color:#c62828;font-weight:bold}
.charts{display:flex;flex-wrap:wrap;gap:12px}code{background:#f4f4f4;padding:0 3px}"""


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _verdict(ok: bool) -> str:
    return '<span class="pass">PASS</span>' if ok else '<span class="fail">FAIL</span>'


def _per_step(report: dict[str, Any], key: str, agg) -> dict[str, list[float]]:
    """For each backend, AGG over prompts of KEY at every step index."""
    out = {}
    for b in report["backends"]:
        n = max(len(p["steps"]) for p in b["prompts"])
        out[b["backend"]] = [agg([p["steps"][k][key] for p in b["prompts"] if k < len(p["steps"])]) for k in range(n)]
    return out


def charts(report: dict[str, Any]) -> list[str]:
    """The report's plots as inline SVG strings."""
    out = [
        line_chart("chart-step-error", "Max |delta logit| per step (worst prompt)",
                   _per_step(report, "max_abs", max), "teacher-forced step", "max |delta logit|", log=True),
        line_chart("chart-top1", "Top-1 agreement per step (fraction of prompts)",
                   _per_step(report, "top1", lambda v: sum(v) / len(v)), "teacher-forced step", "agreement"),
    ]
    lay = report.get("layers")
    if lay:
        rows = lay["rows"]
        labels = ["emb" if r["index"] == 0 else str(r["index"] - 1) for r in rows]
        entered = lay["first_over"] is not None
        key = "red: error enters (first over threshold)" if entered else "orange: largest increase (none over threshold)"
        out.append(bar_chart("chart-layer-error", "Hidden-state drift per layer (relative L2, worst prompt)",
                             labels, [r["rel_l2"] for r in rows], f"decoder layer (emb = embeddings; last includes the "
                             f"final norm); {key}", "rel L2", log=True,
                             highlight=lay["first_over"] if entered else lay["largest_jump"],
                             highlight_color="#d62728" if entered else "#ff7f0e"))
    for b in report["backends"]:
        h = b["histogram"]
        labels = [f"1e{round(math.log10(e))}" for e in h["edges"][:-1]]
        out.append(bar_chart(f"chart-histogram-{b['backend']}", f"|delta logit| histogram ({b['backend']}, all steps)",
                             labels, [float(c) for c in h["counts"]], f"|delta logit| (exact zeros: {h['zeros']})",
                             "count", log=True, tick_every=4))
    return out


def bundle_kind(report: dict[str, Any]) -> str:
    """One line: dtype, quantization, long context (and whether flags set it), debug / external data."""
    b = report["bundle"]
    q = b["quantization"]
    parts = [b["dtype"] + (f", {q['scheme']} block {q['block_size']}" if q else ""),
             b["long_context"] + (" (export flags)" if b["long_context_overrides"] else "")]
    parts += [name for name, on in (("debug hidden states", b["debug_hidden_states"]),
                                    ("external data", b["external_data"])) if on]
    return "; ".join(parts)


def _worst_layer(lay: dict[str, Any] | None, backend: str) -> str:
    return f"{max(r['rel_l2'] for r in lay['rows']):.2e}" if lay and lay["backend"] == backend else "n/a"


def render_html(report: dict[str, Any]) -> str:
    """The whole page."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>qwen2edge compare</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>qwen2edge {escape(report['preset'])}: {_verdict(report['passed'])}</h1>",
             f"<p>Reference: {escape(report['reference']['name'])}; weights: {escape(report['reference']['weights'])}"
             f"<br>Model: <code>{escape(report['model_dir'])}</code><br>"
             f"Bundle: <code>{escape(report['bundle_dir'])}</code> ({escape(bundle_kind(report))}); "
             f"{report['steps']} teacher-forced steps per prompt; {escape(report['created'])}</p>",
             *(f"<p>Note: {escape(n)}</p>" for n in report["notes"]),
             "<h2>Summary</h2>"]
    lay = report.get("layers")
    parts.append(_table(
        ["backend", "row", "max abs", "mean abs", "max rel", "min cos", "mean KL", "top-1", "top-5", "greedy",
         "ppl delta", "worst layer rel", "verdict"],
        [[escape(b["backend"]), escape(b["tolerance_row"]), f"{s['max_abs']:.2e}", f"{s['mean_abs']:.2e}", f"{s['max_rel']:.2e}",
          f"{s['min_cosine']:.6f}", f"{s['mean_kl']:.2e}", f"{s['top1']:.1%}", f"{s['top5']:.1%}",
          f"{s['greedy_match']}/{s['greedy_steps']}",
          "n/a" if s["max_ppl_delta"] is None else f"{s['max_ppl_delta']:.2e}",
          _worst_layer(lay, b["backend"]), _verdict(b["passed"])]
         for b in report["backends"] for s in [b["summary"]]]))
    for b in report["backends"]:
        if b["failures"]:
            parts.append(f"<p><b>{escape(b['backend'])} failures</b></p><ul>"
                         + "".join(f"<li>{escape(f)}</li>" for f in b["failures"]) + "</ul>")
    if lay and lay["failures"]:
        parts.append("<p><b>per-layer drift failures</b></p><ul>"
                     + "".join(f"<li>{escape(f)}</li>" for f in lay["failures"]) + "</ul>")
    if lay:
        where = lay["first_over_name"] or "nowhere above the threshold"
        parts.append(f"<p>Per-layer drift ({escape(lay['source'])}, {escape(lay['backend'])}): error enters at "
                     f"<b>{escape(where)}</b>; largest increase at <b>{escape(lay['largest_jump_name'])}</b>.</p>")
    parts.append('<h2>Plots</h2><div class="charts">' + "".join(charts(report)) + "</div>")
    for b in report["backends"]:
        parts.append(f"<h2>{escape(b['backend'])}: per prompt</h2>")
        parts.append(_table(
            ["prompt", "category", "tokens", "prefill max abs", "steps max abs", "top-1", "greedy", "reference / backend text"],
            [[escape(p["id"]), escape(p["category"]), str(p["prompt_tokens"]), f"{p['prefill']['max_abs']:.2e}",
              f"{max(s['max_abs'] for s in p['steps']):.2e}", f"{p['top1']:.1%}",
              f"{p['greedy_match']}/{p['greedy_steps']}",
              f"ref: {escape(p['reference_text'][:80])}<br>got: {escape(p['backend_text'][:80])}"]
             for p in b["prompts"]]))
        if b["perplexity"]:
            parts.append(_table(["text", "category", "tokens", "ppl ref", "ppl", "delta"],
                                [[escape(q["id"]), escape(q["category"]), str(q["tokens"]), f"{q['ppl_ref']:.4f}",
                                  f"{q['ppl']:.4f}", f"{q['delta']:+.2e}"] for q in b["perplexity"]]))
    if lay:
        parts.append("<h2>Per-layer drift</h2>")
        parts.append(_table(["hidden state", "max abs", "mean abs", "rel L2", "cosine"],
                            [[escape(r["name"]) + (" <b>&larr; error enters</b>" if r["index"] == lay["first_over"] else ""),
                              f"{r['max_abs']:.2e}", f"{r['mean_abs']:.2e}", f"{r['rel_l2']:.2e}", f"{r['cosine']:.6f}"]
                             for r in lay["rows"]]))
    parts.append("<h2>Thresholds</h2>")
    parts.append(_table(["backend", "row", "key", "must be", "bound"],
                        [[escape(b["backend"]), escape(b["tolerance_row"]),
                          escape(c["key"]) + (" (override)" if c["key"] in report["threshold_overrides"] else ""),
                          escape(c["passes_when"]), f"{c['bound']:g}"] for b in report["backends"] for c in b["checks"]]))
    parts.append("</body></html>")
    return "\n".join(parts)

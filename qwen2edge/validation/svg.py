"""Minimal inline-SVG charts (line and bar) for the self-contained HTML report: no plotting dependency."""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

W, H = 640, 260
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 28, 44
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _fmt(v: float, log: bool) -> str:
    return f"1e{int(round(v))}" if log else f"{v:.3g}"


def _scale(values: Sequence[float], log: bool) -> tuple[list[float | None], float, float]:
    """Values mapped to plot units (log10 when LOG; non-positive log values become None) and the range."""
    mapped: list[float | None] = []
    for v in values:
        if v is None or not math.isfinite(v) or (log and v <= 0):
            mapped.append(None)
        else:
            mapped.append(math.log10(v) if log else float(v))
    real = [m for m in mapped if m is not None] or [0.0]
    lo, hi = min(real), max(real)
    if log:
        lo, hi = math.floor(lo), math.ceil(hi)
    if hi - lo < 1e-12:
        lo, hi = lo - (1 if log else 0.5), hi + (1 if log else 0.5)
    return mapped, lo, hi


def _frame(title: str, xlabel: str, ylabel: str, lo: float, hi: float, log: bool, ticks_x: list[tuple[float, str]],
           chart_id: str) -> list[str]:
    ph = H - PAD_T - PAD_B
    out = [f'<svg id="{escape(chart_id)}" class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}">',
           f'<title>{escape(title)}</title>',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{ph}" fill="none" stroke="#999"/>']
    if log:  # one tick per decade (or every few decades on a wide range), never between decades
        step = max(1, math.ceil((hi - lo) / 6))
        values = [float(v) for v in range(int(lo), int(hi) + 1, step)]
    else:
        values = [lo + (hi - lo) * i / 4 for i in range(5)]
    for v in values:
        y = PAD_T + ph * (1 - (v - lo) / (hi - lo))
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{PAD_L - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{_fmt(v, log)}</text>')
    for x, label in ticks_x:
        out.append(f'<text x="{x:.1f}" y="{H - PAD_B + 14}" text-anchor="middle" font-size="10">{escape(label)}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 6}" text-anchor="middle" font-size="11">{escape(xlabel)}</text>')
    out.append(f'<text x="14" y="{H / 2}" text-anchor="middle" font-size="11" '
               f'transform="rotate(-90 14 {H / 2})">{escape(ylabel)}</text>')
    return out


def line_chart(chart_id: str, title: str, series: dict[str, Sequence[float]], xlabel: str, ylabel: str,
               log: bool = False, x0: int = 0) -> str:
    """One polyline per series over x = x0, x0+1, ...; LOG plots log10(y)."""
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    scaled = {k: _scale(v, log) for k, v in series.items()}
    lo = min((s[1] for s in scaled.values()), default=0.0)
    hi = max((s[2] for s in scaled.values()), default=1.0)
    n = max((len(v) for v in series.values()), default=1)
    xs = lambda i: PAD_L + pw * (i / max(n - 1, 1))  # noqa: E731
    ticks = [(xs(i), str(i + x0)) for i in range(0, n, max(1, n // 8))]
    out = _frame(title, xlabel, ylabel, lo, hi, log, ticks, chart_id)
    for c, (name, (mapped, _, _)) in enumerate(scaled.items()):
        color = COLORS[c % len(COLORS)]
        pts = [(xs(i), PAD_T + ph * (1 - (m - lo) / (hi - lo))) for i, m in enumerate(mapped) if m is not None]
        if pts:
            out.append(f'<polyline class="series" data-series="{escape(name)}" fill="none" stroke="{color}" '
                       f'stroke-width="1.5" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{color}"/>' for x, y in pts]
        out.append(f'<text x="{PAD_L + 8 + 110 * c}" y="{PAD_T + 14}" font-size="11" fill="{color}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(chart_id: str, title: str, labels: Sequence[str], values: Sequence[float], xlabel: str, ylabel: str,
              log: bool = False, highlight: int | None = None, highlight_color: str = "#d62728",
              tick_every: int | None = None) -> str:
    """Vertical bars; bar HIGHLIGHT is drawn in HIGHLIGHT_COLOR (e.g. where error enters)."""
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    mapped, lo, hi = _scale(values, log)
    if not log:
        lo = min(lo, 0.0)
    n = max(len(values), 1)
    bw = pw / n
    every = tick_every or max(1, n // 10)
    ticks = [(PAD_L + bw * (i + 0.5), labels[i]) for i in range(0, len(labels), every)]
    out = _frame(title, xlabel, ylabel, lo, hi, log, ticks, chart_id)
    for i, m in enumerate(mapped):
        if m is None:
            continue
        y = PAD_T + ph * (1 - (m - lo) / (hi - lo))
        color = highlight_color if i == highlight else "#1f77b4"
        out.append(f'<rect class="bar" x="{PAD_L + bw * i + bw * 0.1:.1f}" y="{y:.1f}" width="{bw * 0.8:.1f}" '
                   f'height="{PAD_T + ph - y:.1f}" fill="{color}"><title>{escape(labels[i])}: {values[i]:.3g}</title></rect>')
    out.append("</svg>")
    return "\n".join(out)

"""Inline SVG line plots for the report (no script, no network): round ticks and one line per series."""

from __future__ import annotations

import html
import math


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (whole numbers only when ``integer``)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, math.ceil(step))
    start = math.floor(lo / step) * step
    ticks, v = [], start
    # until a tick reaches hi: the axis ends on the last tick, so a value above it would be drawn off the chart
    while (len(ticks) < 2 or ticks[-1] < hi - step * 1e-9) and len(ticks) < 50:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _num(v: float) -> str:
    return f"{v:.3g}" if v != 0 else "0"


def svg_line_plot(xs: list[float], ys: list[float], title: str, width: int = 440, height: int = 230,
                  color: str = "#1f6feb") -> str:
    """An inline SVG line chart (class ``plot``) of the finite points of (xs, ys)."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys)
           if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    esc = html.escape(title)
    left, right, top, bottom = 58, 14, 26, 34
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
             f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="13" font-weight="600">{esc}</text>']
    if not pts:
        parts.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" font-size="12" '
                     'fill="#666">no data</text></svg>')
        return "".join(parts)
    x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
    y_ticks = nice_ticks(min(p[1] for p in pts), max(p[1] for p in pts))
    x_int = all(float(p[0]).is_integer() for p in pts)
    x_ticks = nice_ticks(x_lo, x_hi, integer=x_int) if x_hi > x_lo else [x_lo]
    y0, y1 = y_ticks[0], y_ticks[-1]
    xa, xb = (x_ticks[0], x_ticks[-1]) if x_hi > x_lo else (x_lo - 1, x_hi + 1)

    def sx(x):
        return left + (x - xa) / (xb - xa) * pw

    def sy(y):
        return top + ph - (y - y0) / (y1 - y0) * ph

    for t in y_ticks:
        yy = sy(t)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e5e7eb"/>')
        parts.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end" font-size="11">{_num(t)}</text>')
    for t in x_ticks:
        xx = sx(t)
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#333"/>')
        parts.append(f'<text x="{xx:.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">{_num(t)}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#333"/>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#333"/>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" font-size="11" '
                 'fill="#444">step</text>')
    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{coords}"/>')
    if len(pts) <= 40:
        parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
    parts.append("</svg>")
    return "".join(parts)

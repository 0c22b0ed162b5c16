"""Inline SVG line plots for the report and the benchmarks (no script, no network): round ticks, the raw series as a faint line, its
smoothed trend over it, and optional extra points (the held-out evaluations during training) as markers.

The smoothing is the debiased exponential moving average TensorBoard's scalar dashboard applies (its "smoothing"
slider; see tensorboard/plugins/scalar/tf_scalar_dashboard in https://github.com/tensorflow/tensorboard): ``s_i =
w s_{i-1} + (1 - w) y_i`` started at 0, divided by ``1 - w^i`` so that the first points are not pulled to 0.
"""

from __future__ import annotations

import base64
import html
import io
import math
from html import escape

RAW_COLOR = "#9dbff5"  # the raw series under the smoothed line
POINT_COLOR = "#d1242f"  # extra points (held-out reward)


def png_data_uri(img) -> str:
    """A PIL image as a ``data:image/png;base64,...`` URI (the report embeds every image)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def smoothing_weight(n: int) -> float:
    """The EMA weight for ``n`` points: a span of about n/10 points (0 below 10 points: nothing to smooth)."""
    span = n // 10
    return 0.0 if span < 2 else 1 - 2 / (span + 1)


def ema(ys: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average of ``ys`` (finite values) with weight ``weight`` in [0, 1)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys, start=1):
        acc = weight * acc + (1 - weight) * y
        out.append(acc / (1 - weight ** i) if weight > 0 else y)
    return out


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


def _finite(xs, ys) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in zip(xs, ys)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(float(x))
            and math.isfinite(float(y))]


def svg_line_plot(xs: list[float], ys: list[float], title: str, width: int = 440, height: int = 230,
                  color: str = "#1f6feb", smooth: bool = True, points: list[tuple[float, float]] | None = None,
                  points_label: str = "held-out") -> str:
    """An inline SVG line chart (class ``plot``) of the finite points of (xs, ys).

    With ``smooth`` and 10 or more points, the raw series is drawn faint and its :func:`ema` (weight
    :func:`smoothing_weight`) over it in ``color``; ``points`` (x, y) are drawn as red diamonds, with a legend."""
    pts = _finite(xs, ys)
    extra = _finite([p[0] for p in points or []], [p[1] for p in points or []])
    esc = html.escape(title)
    weight = smoothing_weight(len(pts)) if smooth else 0.0
    left, right, top, bottom = 58, 14, 26 + (14 if weight > 0 or extra else 0), 34  # a legend row under the title
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
             f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="13" font-weight="600">{esc}</text>']
    if not pts and not extra:
        parts.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" font-size="12" '
                     'fill="#666">no data</text></svg>')
        return "".join(parts)
    every = pts + extra
    x_lo, x_hi = min(p[0] for p in every), max(p[0] for p in every)
    y_ticks = nice_ticks(min(p[1] for p in every), max(p[1] for p in every))
    x_int = all(float(p[0]).is_integer() for p in every)
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
    legend = []
    if weight > 0:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="raw" fill="none" stroke="{RAW_COLOR}" stroke-width="1" points="{coords}"/>')
        smoothed = ema([y for _, y in pts], weight)
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for (x, _), y in zip(pts, smoothed))
        parts.append(f'<polyline class="smoothed" fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        legend += [(RAW_COLOR, "raw", "line"), (color, f"smoothed (EMA {weight:.2f})", "line")]
    elif pts:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{coords}"/>')
        if len(pts) <= 40:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
    for x, y in extra:
        cx, cy = sx(x), sy(y)
        parts.append(f'<path class="extra-point" d="M{cx:.1f},{cy - 4.5:.1f} L{cx + 4.5:.1f},{cy:.1f} L{cx:.1f},'
                     f'{cy + 4.5:.1f} L{cx - 4.5:.1f},{cy:.1f} Z" fill="{POINT_COLOR}">'
                     f"<title>{html.escape(points_label)} step {_num(x)}: {y:.4g}</title></path>")
    if extra:
        legend.append((POINT_COLOR, points_label, "point"))
    lx = left + 6
    for col, label, kind in legend:
        mark = (f'<line x1="{lx}" x2="{lx + 14}" y1="28" y2="28" stroke="{col}" stroke-width="2"/>'
                if kind == "line" else f'<rect x="{lx + 3}" y="24" width="7" height="7" fill="{col}" '
                                       f'transform="rotate(45 {lx + 6.5} 27.5)"/>')
        parts.append(mark + f'<text x="{lx + 18}" y="32" font-size="10" fill="#444">'
                            f"{html.escape(label)}</text>")
        lx += 26 + 6 * len(label)
    parts.append("</svg>")
    return "".join(parts)


COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#ff7f0e", "#17becf", "#7f7f7f")


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for mult in (1, 2, 5):
            v = mult * 10**e
            if lo <= v <= hi:
                ticks.append(v)
    return ticks or [lo, hi]


def svg_plot(series: dict[str, list[tuple[float, float]]], baseline: float | None, title: str, xlabel: str,
             ylabel: str, width: int = 720, height: int = 420, baseline_label: str = "base model") -> str:
    """A multi-series line chart with a log x axis, a dashed baseline and a legend; plain SVG."""
    pts = [(x, y) for s in series.values() for x, y in s if x > 0 and math.isfinite(y)]
    left, right, top, bottom = 70, 170, 30, 48
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif">',
             f'<rect width="{width}" height="{height}" fill="#fff"/>',
             f'<text x="{left + pw / 2:.1f}" y="18" text-anchor="middle" font-size="14" font-weight="600">'
             f'{escape(title)}</text>']
    if not pts:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts] + ([baseline] if baseline is not None else [])
    x_lo, x_hi = min(xs), max(xs)
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo / 2, x_hi * 2
    lx0, lx1 = math.log10(x_lo) - 0.05, math.log10(x_hi) + 0.05
    y_ticks = nice_ticks(min(ys), max(ys)) if max(ys) > min(ys) else [min(ys) - 1e-3, max(ys) + 1e-3]
    y0, y1 = y_ticks[0], y_ticks[-1]

    def sx(x):
        return left + (math.log10(x) - lx0) / (lx1 - lx0) * pw

    def sy(y):
        return top + ph - (y - y0) / (y1 - y0) * ph

    for t in y_ticks:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#e5e7eb"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="11">{t:.3g}</text>')
    for t in _log_ticks(10**lx0, 10**lx1):
        parts.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{top + ph}" stroke="#f0f0f0"/>')
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="middle" font-size="11">{t:.3g}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 10}" text-anchor="middle" font-size="12">'
                 f'{escape(xlabel)}</text>')
    parts.append(f'<text transform="translate(16 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
                 f'font-size="12">{escape(ylabel)}</text>')
    if baseline is not None:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(baseline):.1f}" y2="{sy(baseline):.1f}" '
                     'stroke="#555" stroke-dasharray="5 4"/>')
    for i, (label, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        good = [(x, y) for x, y in s if x > 0 and math.isfinite(y)]
        if good:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in good]
        ly = top + 14 + 18 * i
        parts.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 34}" y1="{ly}" y2="{ly}" stroke="{color}" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{left + pw + 40}" y="{ly + 4}" font-size="12">{escape(label)}</text>')
    if baseline is not None:
        ly = top + 14 + 18 * len(series)
        parts.append(f'<line x1="{left + pw + 12}" x2="{left + pw + 34}" y1="{ly}" y2="{ly}" stroke="#555" '
                     'stroke-dasharray="5 4"/>')
        parts.append(f'<text x="{left + pw + 40}" y="{ly + 4}" font-size="12">{escape(baseline_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)

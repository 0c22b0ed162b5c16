"""Inline SVG line plots for the report (no script, no network): round ticks, the raw series as a faint line, its
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

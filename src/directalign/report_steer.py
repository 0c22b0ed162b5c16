"""The "fine-tune, steer, or both" picture: held-out reward against compute per image for steering on the base model
and on the tuned model (training NFE amortised over a stated number of images), from the JSON that
``benchmarks/steer_frontier.py`` writes into a run directory (``steer_frontier.json``). The run's report shows it
when the file is there; the benchmark writes the same plots next to its tables."""

from __future__ import annotations

import html
import json
from pathlib import Path

from .report_plots import svg_plot

FRONTIER_FILE = "steer_frontier.json"


def _envelope(points: list[dict]) -> list[tuple[float, float]]:
    """The Pareto front (NFE ascending, reward strictly rising) of ``points`` (each with nfe_per_image, reward)."""
    out: list[tuple[float, float]] = []
    for p in sorted(points, key=lambda p: (p["nfe_per_image"], -p["reward"])):
        if not out or p["reward"] > out[-1][1]:
            out.append((p["nfe_per_image"], p["reward"]))
    return out


def frontier_svg(report: dict, m: int) -> str:
    """Best held-out reward reachable at each compute per image: steering the base model, fine-tuning alone, and
    fine-tuning then steering, with training amortised over ``m`` images."""
    pts = report["frontier"][str(m)] if str(m) in report["frontier"] else report["frontier"][m]
    base = next((p["reward"] for p in pts if p["kind"] == "base"), None)
    series = {  # the single fine-tune point last, so it is drawn over the line that starts at it
        "steer base": _envelope([p for p in pts if p["model"] == "base"]),
        "fine-tune + steer": _envelope([p for p in pts if p["model"] == "tuned"]),
        "fine-tune alone": [(p["nfe_per_image"], p["reward"]) for p in pts if p["kind"] == "fine-tune"],
    }
    return svg_plot(series, base, f"Fine-tune, steer, or both (training amortised over {m} images)",
                    "model calls per image (NFE; training NFE / images for the tuned model)", "held-out reward",
                    baseline_label="base, plain sampling")


def reward_vs_nfe_svg(report: dict, model: str) -> str:
    """Held-out reward against sampling NFE per image for every steering method on ``model`` (base or tuned)."""
    rows = [r for r in report["rows"] if r["model"] == model]
    plain = next((r["reward"] for r in rows if r["method"] == "best-of-n" and r["options"].get("n") == 1), None)
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["method"] != "best-of-n" and plain is not None:
            series.setdefault(r["method"], [(rows[0]["nfe_per_image"], plain)])
        series.setdefault(r["method"], []).append((r["nfe_per_image"], r["reward"]))
    title = "base model" if model == "base" else "SRPO-tuned model"
    return svg_plot({k: sorted(v) for k, v in series.items()}, plain, f"Steering the {title}: reward against NFE",
                    "model calls per image at sampling (NFE, with + without gradient)", "held-out reward",
                    baseline_label="plain sampling")


def _row(p: dict) -> str:
    fid = "-" if p.get("fidelity") is None else f"{p['fidelity']:.3f}"
    cells = [html.escape(p["kind"]), html.escape(p["method"]), html.escape(json.dumps(p["options"]))]
    return ("<tr>" + "".join(f'<td class="l">{c}</td>' for c in cells)
            + f"<td>{p['nfe_per_image']:.1f}</td><td>{p['reward']:+.4f}</td><td>{fid}</td></tr>")


def steer_section(run_dir: Path, m: int = 1000) -> str:
    """The report's section for ``RUN/steer_frontier.json`` ('' when absent or unreadable)."""
    try:
        report = json.loads((Path(run_dir) / FRONTIER_FILE).read_text(encoding="utf-8"))
        svg = frontier_svg(report, m)
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    pts = report["frontier"].get(str(m), [])
    rows = "".join(_row(p) for p in sorted((p for p in pts if p.get("pareto")), key=lambda p: p["nfe_per_image"]))
    return ("<h2>Fine-tune, steer, or both</h2>"
            f"<p>From <code>{html.escape(report.get('command', ''))}</code>: {report.get('n_images')} held-out images; "
            f"training {report['train']['nfe']:.0f} NFE amortised over {m} images.</p>"
            f'<div class="plots">{svg}</div>'
            "<table><tr><th class=\"l\">kind</th><th class=\"l\">method</th><th class=\"l\">options</th>"
            f"<th>NFE / image</th><th>reward</th><th>fidelity</th></tr>{rows}</table>")

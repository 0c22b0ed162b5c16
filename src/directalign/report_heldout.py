"""The report's section on the held-out samples taken during training (``run.sample_every``, ``heldout.jsonl``):
one row per sampled step with its held-out reward and its grid (``samples/step-<N>.png``), at most
:data:`MAX_ROWS` rows spread over the run (the first and the last always among them)."""

from __future__ import annotations

import html
from pathlib import Path

from .report_plots import png_data_uri

MAX_ROWS = 12


def spread(items: list, n: int = MAX_ROWS) -> list:
    """At most ``n`` items spread evenly over ``items``, the first and the last included."""
    if len(items) <= n:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})
    return [items[i] for i in idx]


def heldout_points(records: list[dict]) -> list[tuple[float, float]]:
    """(step, held-out reward) of every record with a reward."""
    return [(r["step"], r["reward"]) for r in records
            if isinstance(r.get("step"), (int, float)) and isinstance(r.get("reward"), (int, float))]


def _grid(run_dir: Path, rel) -> str:
    from PIL import Image, UnidentifiedImageError

    if not isinstance(rel, str) or ".." in Path(rel).parts or Path(rel).is_absolute():
        return "-"
    path = run_dir / rel
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        return "-"
    return (f'<img class="px sample" src="{png_data_uri(img)}" width="{img.width}" height="{img.height}" '
            f'alt="held-out samples: {html.escape(rel)}">')


def heldout_section(run_dir: Path, records: list[dict], every: int | None = None) -> str:
    """HTML of the held-out samples during training (empty string without records)."""
    if not records:
        return ""
    run_dir = Path(run_dir)
    shown = spread(records)
    first = records[0]
    prompts = first.get("prompts") or []
    seeds = first.get("seeds") or []
    desc = (f"every {every} steps (run.sample_every), " if every else "") + \
        f"{len(prompts)} held-out prompts x seeds {html.escape(str(seeds))}, the same at every step"
    parts = [(f'<p class="muted">Samples of the weights during training, {desc}; each row shows, left to right, '
              "each prompt's seeds side by side. The reward curve above marks these held-out rewards (red "
              "diamonds); the held-out evaluation before and after training uses every held-out prompt and "
              "seed.</p>")]
    if prompts:
        parts.append('<p class="muted">Prompts: ' + " &middot; ".join(html.escape(str(p)) for p in prompts) + "</p>")
    if len(shown) < len(records):
        parts.append(f'<p class="muted">Showing {len(shown)} of {len(records)} sampled steps.</p>')
    rows = []
    for r in shown:
        reward = r.get("reward")
        value = f"{reward:.4f}" if isinstance(reward, (int, float)) else "-"
        rows.append(f'<tr><td>{html.escape(str(r.get("step")))}</td><td>{value}</td>'
                    f'<td class="l">{_grid(run_dir, r.get("image"))}</td></tr>')
    parts.append('<table class="heldout"><tr><th>step</th><th>held-out reward</th><th class="l">samples</th></tr>'
                 + "".join(rows) + "</table>")
    return "".join(parts)

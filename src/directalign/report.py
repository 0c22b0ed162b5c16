"""A self-contained HTML report of a run: ``directalign report RUN_DIR`` or :func:`write_report`.

The page needs no network and runs no script: images are embedded as base64 PNG data URIs and the training curves
are inline SVG drawn here. It shows

* the run's headline numbers and the eval table of ``summary.json`` (held-out training reward before / best-of-n /
  after, and the tiny world's judge rates);
* training curves of ``metrics.jsonl``: reward, loss, grad norm, seconds per step, and every metric of the
  method (SRPO: per-branch reward, sigma and k; GRPO: KL, clip fraction, ...) and of the reward (a sum's terms),
  each raw and smoothed (:mod:`directalign.report_plots`), the reward curve with the held-out points of
  ``heldout.jsonl`` on it;
* the held-out sample grids taken during training (``run.sample_every``, :mod:`directalign.report_heldout`);
* before / after samples per held-out prompt, cut from ``samples/before.png`` and ``samples/after.png``;
* the hacking indicators of :mod:`directalign.metrics` (saturation, brightness, colourfulness, high-frequency
  energy, diversity across seeds) measured on those samples, with a plain warning when one drifts beyond its
  threshold in :data:`directalign.metrics.DRIFT_THRESHOLDS`;
* ``eval/aggregate.json`` of the run directory if ``directalign eval --model RUN --out RUN/eval`` wrote one;
* the full ``config.yaml``.
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from .errors import UserError
from .report_heldout import heldout_points, heldout_section
from .report_steer import steer_section
from .report_plots import nice_ticks, png_data_uri, svg_line_plot  # noqa: F401  (re-exported)

GRID_PAD = 2  # report_images.save_grid's layout: white padding, nearest upscaling, ncol = seeds x 4 (trainer)
GRID_UPSCALE = 3
GRID_PROMPTS_PER_ROW = 4

CURVES = (("reward", "reward (training batch)"), ("loss", "loss"), ("grad_norm", "gradient norm (before clipping)"),
          ("step_seconds", "seconds per step"))
# Keys of every metrics.jsonl record that are bookkeeping, not curves; every other numeric key is a method's or a
# reward's own metric (SRPO's per-branch k and sigma, GRPO's KL and clip fraction, a weighted sum's terms, ...).
NOT_CURVES = {"step", "lr", "skipped", "nfe_no_grad", "nfe_grad"} | {k for k, _ in CURVES}


def method_metric_keys(records: list[dict]) -> list[str]:
    """The method's and reward's own numeric metrics present in the records, in first-seen order."""
    keys: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k)
    return list(keys)


# -------------------------------------------------------------------------------------------------- images
def grid_tiles(grid, n: int, ncol: int, h: int, w: int, pad: int = GRID_PAD, upscale: int = GRID_UPSCALE):
    """Cut the ``n`` tiles (displayed size, PIL images) out of a grid written by ``report_images.save_grid``.

    Returns None when the grid's size does not match that layout (then the report shows the whole grid).
    """
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    if grid.size != ((ncol * (w + pad) + pad) * upscale, (nrow * (h + pad) + pad) * upscale):
        return None
    tiles = []
    for i in range(n):
        r, c = divmod(i, ncol)
        x0, y0 = (pad + c * (w + pad)) * upscale, (pad + r * (h + pad)) * upscale
        tiles.append(grid.crop((x0, y0, x0 + w * upscale, y0 + h * upscale)))
    return tiles


def tiles_to_tensor(tiles, upscale: int = GRID_UPSCALE):
    """Displayed tiles -> the generated images (N, 3, h, w) in [0, 1] (8-bit), undoing the nearest upscaling."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(t.convert("RGB"))[::upscale, ::upscale] for t in tiles]).astype(np.float32) / 255
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def strip(tiles, gap: int = 4):
    """Tiles side by side on white."""
    from PIL import Image

    w = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    h = max(t.height for t in tiles)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width + gap
    return canvas


# -------------------------------------------------------------------------------------------------- page
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#1f2328;padding:0 16px;background:#fff}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;margin-top:32px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right;font-size:13px}
th{background:#f6f8fa}td.l,th.l{text-align:left}.muted{color:#656d76;font-size:13px}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots svg{border:1px solid #d0d7de}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:8px 12px;margin:6px 0;border-radius:6px}
.ok{background:#dafbe1;border:1px solid #4ac26b;padding:8px 12px;margin:6px 0;border-radius:6px}
img.px{image-rendering:pixelated}pre{background:#f6f8fa;padding:12px;overflow:auto;font-size:12px;border-radius:6px}
td.prompt{text-align:left;max-width:320px}
"""


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return "-" if isinstance(v, float) and not math.isfinite(v) else f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list], left_cols: int = 1) -> str:
    out = ["<table><tr>"]
    out += [f'<th class="{"l" if i < left_cols else ""}">{html.escape(h)}</th>' for i, h in enumerate(header)]
    out.append("</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="{"l" if i < left_cols else ""}">{c}</td>'
                                     for i, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _eval_section(summary: dict | None) -> str:
    if not summary:
        return '<p class="muted">No summary.json: the run has not finished its final evaluation.</p>'
    rows = []
    before, after = summary.get("reward_before"), summary.get("reward_after")
    rows.append(["held-out reward, base model", _fmt(before)])
    for k, v in summary.items():
        if k.startswith("reward_best_of_") and v is not None:
            rows.append([f"held-out reward, base model best-of-{k.rsplit('_', 1)[-1]}", _fmt(v)])
    rows.append(["held-out reward, tuned model", _fmt(after)])
    if before is not None and after is not None:
        rows.append(["change", f"{after - before:+.4f}"])
    parts = [_table(["metric", "value"], rows)]
    jb, ja = summary.get("judge_before") or {}, summary.get("judge_after") or {}
    if jb or ja:
        keys = list(dict.fromkeys([*jb, *ja]))
        parts.append("<p>Tiny-world judge (analytic; fraction of images whose attribute matches the prompt, and the "
                     "share of images judged textured / dark):</p>")
        parts.append(_table(["attribute", "base", "tuned", "change"],
                            [[html.escape(k), _fmt(jb.get(k), 3), _fmt(ja.get(k), 3),
                              f"{ja[k] - jb[k]:+.3f}" if k in ja and k in jb else "-"] for k in keys]))
    info = [f"{k}: {html.escape(json.dumps(summary[k]))}" for k in ("eval_prompts", "eval_seeds", "skipped_steps",
                                                                   "reward_definition") if k in summary]
    if info:
        parts.append('<p class="muted">' + " &middot; ".join(info) + "</p>")
    return "".join(parts)


def _indicator_section(before, after, groups) -> str:
    from . import metrics as M

    if before is None or after is None:
        return '<p class="muted">Before / after samples are missing, so no indicators can be measured.</p>'
    mb = {k: float(v.mean()) for k, v in M.image_indicators(before).items()}
    ma = {k: float(v.mean()) for k, v in M.image_indicators(after).items()}
    mb["diversity_pixel"] = M.diversity(before, groups)
    ma["diversity_pixel"] = M.diversity(after, groups)
    warnings = M.drift_warnings(mb, ma)
    rows = []
    for k in [*M.INDICATORS, "diversity_pixel"]:
        kind, t = M.DRIFT_THRESHOLDS.get(k, ("", None))
        b, a = mb[k], ma[k]
        thr = {"abs": f"|change| &gt; {t:.2f}", "rel": f"|change| &gt; {t:.0%}", "drop": f"fall &gt; {t:.0%}"}.get(
            kind, "-")
        hit = any(w.startswith(k + " ") for w in warnings)
        desc = M.INDICATORS.get(k, "mean RMS pixel distance between seeds of one prompt")
        rows.append([f"{html.escape(k)}<br><span class=\"muted\">{html.escape(desc)}</span>", _fmt(b), _fmt(a),
                     _fmt(a - b) if math.isfinite(a) and math.isfinite(b) else "-", thr,
                     "<b>WARNING</b>" if hit else "ok"])
    parts = ['<p class="muted">Measured on the 8-bit held-out samples of the base and the tuned model (same prompts '
             "and seeds). Thresholds: directalign.metrics.DRIFT_THRESHOLDS.</p>",
             _table(["indicator", "base", "tuned", "change", "threshold", "status"], rows)]
    if warnings:
        parts += [f'<div class="warn">Warning: {html.escape(w)}</div>' for w in warnings]
        parts.append('<p class="muted">A drift is not always hacking: a run whose control words target an attribute '
                     "(the tiny world's default pushes toward &quot;textured&quot;) moves it on purpose. Look at the "
                     "samples below.</p>")
    else:
        parts.append('<div class="ok">No hacking indicator drifted beyond its threshold.</div>')
    return "".join(parts)


def _aggregate_section(agg: dict) -> str:
    rows = []
    if agg.get("reward") is not None:
        rows.append(["reward (training definition)", _fmt(agg["reward"]), "-", "-"])
    for k, v in (agg.get("metrics") or {}).items():
        rows.append([html.escape(k), _fmt(v.get("mean")), _fmt(v.get("ci95_low")), _fmt(v.get("ci95_high"))])
    for k, v in (agg.get("diversity") or {}).items():
        rows.append([f"diversity.{html.escape(k)}", _fmt(v), "-", "-"])
    return _table(["metric", "mean", "95% CI low", "95% CI high"], rows)


def _source_thumbnails(cfg, prompts: list[str]) -> dict:
    """``{prompt: PIL image}``: each held-out prompt's source image at the samples' size, for a family that edits
    images (Qwen-Image-Edit); ``{}`` for text-to-image, or when the manifest or an image cannot be read (the run
    itself checked them; the report still renders)."""
    from .source_images import load_source_image, manifest_images, needs_source_images

    try:
        if not needs_source_images(cfg.model.family):
            return {}
        images = manifest_images(cfg.eval.prompts)
    except (UserError, OSError, KeyError):
        return {}
    size = (cfg.model.width * GRID_UPSCALE, cfg.model.height * GRID_UPSCALE)
    out = {}
    for prompt in prompts:
        try:
            out[prompt] = load_source_image(images[prompt]).resize(size)
        except (UserError, OSError, KeyError):
            continue
    return out


def render_report(run_dir: Path) -> str:
    """The report's HTML for ``run_dir`` (see the module docstring)."""
    from PIL import Image

    from .config import load_run_config
    from .engine.config import ConfigError
    from .logging_utils import read_heldout, read_metrics
    from .prompts import PromptError, load_prompts

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    cfg_text = cfg_path.read_text(encoding="utf-8")
    try:
        cfg = load_run_config(cfg_path)
    except ConfigError:
        cfg = None
    summary = _load_json(run_dir / "summary.json") or _load_json(run_dir / "summary_before.json")
    records = read_metrics(run_dir)
    heldout = read_heldout(run_dir)
    name = html.escape(run_dir.resolve().name)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    body = [f"<h1>directalign run: {name}</h1>",
            f'<p class="muted">{html.escape(str(run_dir.resolve()))} &middot; report written {now}</p>']
    if cfg is not None:
        body.append(f'<p>Method <b>{html.escape(cfg.method)}</b> on <b>{html.escape(cfg.model.path)}</b>, reward '
                    f"<b>{html.escape(cfg.reward.kind)}</b> ({html.escape(cfg.reward.form)} form, positive "
                    f"{html.escape(', '.join(cfg.reward.positive_words))}, negative "
                    f"{html.escape(', '.join(cfg.reward.negative_words))}), {cfg.train.steps} steps of batch "
                    f"{cfg.train.batch_size}, {html.escape(cfg.train.finetune)} fine-tuning.</p>")

    body.append("<h2>Held-out evaluation</h2>")
    body.append(_eval_section(summary))

    body.append("<h2>Training curves</h2>")
    if records or heldout:
        steps = [r.get("step") for r in records]
        points = heldout_points(heldout)
        plots = [svg_line_plot(steps, [r.get(key) for r in records], title,
                               points=points if key == "reward" else None, points_label="held-out reward")
                 for key, title in CURVES]
        body.append('<div class="plots">' + "".join(plots) + "</div>")
        own = method_metric_keys(records)
        if own:
            body.append(f"<h3>{html.escape(cfg.method if cfg is not None else 'method')} and reward metrics</h3>")
            body.append('<div class="plots">' + "".join(
                svg_line_plot(steps, [r.get(key) for r in records], key) for key in own) + "</div>")
        skipped = sum(1 for r in records if r.get("skipped"))
        if skipped:
            body.append(f'<div class="warn">Warning: {skipped} logged steps were skipped (non-finite loss or '
                        "gradient).</div>")
    else:
        body.append('<p class="muted">No metrics.jsonl records yet.</p>')
    if heldout:
        body.append("<h2>Held-out samples during training</h2>")
        body.append(heldout_section(run_dir, heldout, cfg.run.sample_every if cfg is not None else None))

    # Samples and indicators
    prompts: list[str] = []
    seeds: list[int] = list(cfg.eval.seeds) if cfg is not None else []
    if cfg is not None:
        try:
            prompts = load_prompts(cfg.eval.prompts)
        except (PromptError, FileNotFoundError):
            prompts = []
    grids = {}
    for side in ("before", "after"):
        p = run_dir / "samples" / f"{side}.png"
        if p.is_file():
            grids[side] = Image.open(p).convert("RGB")
    tiles = {}
    if prompts and seeds and cfg is not None:
        n = len(prompts) * len(seeds)
        for side, grid in grids.items():
            tiles[side] = grid_tiles(grid, n, len(seeds) * GRID_PROMPTS_PER_ROW, cfg.model.height,
                                     cfg.model.width * cfg.model.frames)  # videos: frame strips (report_images)

    body.append("<h2>Hacking indicators</h2>")
    if tiles.get("before") and tiles.get("after"):
        groups = [p for p in prompts for _ in seeds]
        body.append(_indicator_section(tiles_to_tensor(tiles["before"]), tiles_to_tensor(tiles["after"]), groups))
    else:
        body.append(_indicator_section(None, None, []))

    body.append(steer_section(run_dir))  # benchmarks/steer_frontier.py's picture, when it ran on this run

    agg = _load_json(run_dir / "eval" / "aggregate.json")
    if agg and isinstance(agg.get("metrics"), dict):
        body.append("<h2>directalign eval (run/eval/aggregate.json)</h2>")
        body.append(_aggregate_section(agg))

    body.append("<h2>Samples: base model vs tuned model, per held-out prompt</h2>")
    if tiles.get("before") or tiles.get("after"):
        body.append(f'<p class="muted">Seeds {html.escape(str(seeds))}, {cfg.eval.steps} steps, guidance '
                    f"{cfg.eval.guidance}; shown at {GRID_UPSCALE}x.</p>")
        rows = []
        k = len(seeds)
        sources = _source_thumbnails(cfg, prompts)  # an edit family: the image each prompt edits
        for i, prompt in enumerate(prompts):
            cells = [f'<td class="prompt">{html.escape(prompt)}</td>']
            if sources:
                im = sources.get(prompt)
                cells.append(f'<td><img class="sample" src="{png_data_uri(im)}" width="{im.width}" '
                             f'height="{im.height}" alt="source: {html.escape(prompt)}"></td>' if im else "<td>-</td>")
            for side in ("before", "after"):
                t = tiles.get(side)
                if t:
                    im = strip(t[i * k:(i + 1) * k])
                    cells.append(f'<td><img class="px sample" src="{png_data_uri(im)}" width="{im.width}" '
                                 f'height="{im.height}" alt="{side}: {html.escape(prompt)}"></td>')
                else:
                    cells.append("<td>-</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
        source_head = "<th>source image</th>" if sources else ""
        body.append(f'<table><tr><th class="l">prompt</th>{source_head}<th>base model</th><th>tuned model</th></tr>'
                    + "".join(rows) + "</table>")
    elif grids:
        for side, grid in grids.items():
            body.append(f"<h3>{side}</h3><img class=\"px sample\" src=\"{png_data_uri(grid)}\" width=\"{grid.width}\" "
                        f"height=\"{grid.height}\" alt=\"{side} grid\">")
    else:
        body.append('<p class="muted">No sample grids in samples/.</p>')

    body.append("<h2>Configuration (config.yaml)</h2>")
    body.append(f"<pre>{html.escape(cfg_text)}</pre>")

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>directalign report: {name}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


class ReportError(UserError, ValueError):
    """The report cannot be written; the message says why and what to do."""


def write_report(run_dir, out=None) -> Path:
    """Write ``report.html`` for the run in ``run_dir`` (or to ``out``) and return its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ReportError(f"{str(run_dir)!r} is not a run directory (no config.yaml); give the run.output_dir of a "
                        "training run")
    path = Path(out) if out is not None else run_dir / "report.html"
    text = render_report(run_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path

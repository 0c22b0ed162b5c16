"""The report's smoothed training curves, the held-out points on the reward curve, and the held-out sample grids
taken during training (``run.sample_every``), on fabricated run directories (no training)."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch

from directalign.config import build_config
from directalign.report import render_report
from directalign.report_heldout import MAX_ROWS, heldout_section, spread
from directalign.report_images import save_grid
from directalign.report_plots import ema, smoothing_weight, svg_line_plot


def _fake_run(tmp_path, n_steps: int = 60, heldout_steps=(0, 20, 40, 60), every: int = 20):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text(build_config({}, [f"run.sample_every={every}"]).to_yaml())
    rng = random.Random(0)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "loss": 1.0 / i, "reward": 0.1 + 0.002 * i + rng.gauss(0, 0.05), "grad_norm": 1.0,
                    "step_seconds": 0.5}) + "\n" for i in range(1, n_steps + 1)))
    g = torch.Generator().manual_seed(0)
    lines = []
    for s in heldout_steps:
        save_grid(torch.rand(4, 3, 32, 32, generator=g), run / "samples" / f"step-{s}.png", ncol=4)
        lines.append(json.dumps({"step": s, "reward": 0.05 + 0.003 * s, "image": f"samples/step-{s}.png",
                                 "prompts": ["a red circle", "a blue square"], "seeds": [0, 1]}))
    (run / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_report_shows_heldout_points_and_grids(tmp_path):
    run = _fake_run(tmp_path)
    text = render_report(run)
    assert "Held-out samples during training" in text and "every 20 steps (run.sample_every)" in text
    # one held-out diamond per record, on the reward curve only
    assert text.count('class="extra-point"') == 4
    reward_svg = text.split('aria-label="reward (training batch)"')[1].split("</svg>")[0]
    assert reward_svg.count('class="extra-point"') == 4 and "held-out reward" in reward_svg
    # every grid embedded (no before/after grids in this run), with its step and reward
    assert text.count('src="data:image/png;base64,') == 4
    for s in (0, 20, 40, 60):
        assert f"<td>{s}</td><td>{0.05 + 0.003 * s:.4f}</td>" in text
    assert "a red circle" in text


def test_every_curve_is_smoothed_over_the_raw_one(tmp_path):
    run = _fake_run(tmp_path)
    text = render_report(run)
    n_plots = text.count('<svg class="plot"')
    assert n_plots == 4
    assert text.count('class="smoothed"') == n_plots and text.count('class="raw"') == n_plots
    assert text.count("smoothed (EMA 0.71)") == n_plots  # 60 points: a span of 6, 1 - 2 / 7


def test_report_without_heldout_records_has_no_section(tmp_path):
    run = _fake_run(tmp_path)
    (run / "heldout.jsonl").unlink()
    text = render_report(run)
    assert "Held-out samples during training" not in text and 'class="extra-point"' not in text


def test_report_caps_the_grids_and_survives_missing_images(tmp_path):
    steps = list(range(0, 301, 10))  # 31 sampled steps
    run = _fake_run(tmp_path, n_steps=300, heldout_steps=steps, every=10)
    (run / "samples" / "step-300.png").unlink()  # the last grid is gone: its row shows "-"
    text = render_report(run)
    assert f"Showing {MAX_ROWS} of {len(steps)} sampled steps" in text
    assert text.count('src="data:image/png;base64,') == MAX_ROWS - 1
    assert "<td>0</td>" in text and "<td>300</td>" in text  # the first and the last step are always shown
    assert text.count('class="extra-point"') == len(steps)  # every point is on the curve


def test_heldout_section_ignores_paths_outside_the_run(tmp_path):
    secret = tmp_path / "elsewhere.png"
    save_grid(torch.rand(1, 3, 8, 8), secret, ncol=1)
    rows = [{"step": 0, "reward": 0.1, "image": "../elsewhere.png"}, {"step": 1, "reward": 0.2, "image": str(secret)}]
    html_text = heldout_section(tmp_path / "run", rows)
    assert "data:image" not in html_text


def test_ema_is_debiased_and_follows_a_constant():
    assert ema([2.0, 2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0] * 4)
    out = ema([0.0, 10.0], 0.5)
    assert out[0] == 0.0 and out[1] == pytest.approx((0.5 * 0.0 * 0.5 + 0.5 * 10.0) / (1 - 0.25))
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert smoothing_weight(9) == 0.0 and smoothing_weight(19) == 0.0
    assert smoothing_weight(20) == pytest.approx(1 / 3) and smoothing_weight(1000) == pytest.approx(1 - 2 / 101)


def test_plot_skips_non_finite_and_null_values_and_fits_the_points():
    xs = list(range(1, 31))
    ys = [None if i == 3 else float("nan") if i == 4 else 0.5 for i in xs]
    svg = svg_line_plot(xs, ys, "reward", points=[(0, 2.0), (30, float("nan"))])
    assert svg.count('class="extra-point"') == 1
    # the y axis reaches the held-out point at 2.0 although every training value is 0.5
    ticks = [float(t) for t in re.findall(r'text-anchor="end" font-size="11">([^<]+)<', svg)]
    assert max(ticks) >= 2.0 and min(ticks) <= 0.5
    assert "nan" not in svg.lower()
    # only held-out points, no training records yet: still a plot, not "no data"
    assert "no data" not in svg_line_plot([], [], "reward", points=[(0, 1.0)])
    assert "no data" in svg_line_plot([], [], "reward")


def test_spread_keeps_the_ends():
    assert spread(list(range(5))) == list(range(5))
    picked = spread(list(range(100)), 12)
    assert len(picked) == 12 and picked[0] == 0 and picked[-1] == 99 and picked == sorted(picked)
    assert all(math.isfinite(p) for p in picked)

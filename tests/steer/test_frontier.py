"""The fine-tune / steer / both frontier (benchmarks/steer_frontier.py, directalign.report_steer) on hand-made rows:
training NFE amortised over M images, the Pareto flags, equal-NFE pairing, and the report section."""

from __future__ import annotations

import json
import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import steer_frontier as sf  # noqa: E402

from directalign.report_steer import FRONTIER_FILE, frontier_svg, steer_section  # noqa: E402


def row(model, method, opts, nfe, reward, fid=1.0):
    return {"model": model, "method": method, "options": opts, "nfe_per_image": nfe, "reward": reward,
            "fidelity": fid}


ROWS = [row("base", "best-of-n", {"n": 1}, 16, -0.15), row("base", "best-of-n", {"n": 4}, 64, -0.08),
        row("base", "fk", {"n": 4}, 64, -0.10), row("tuned", "best-of-n", {"n": 1}, 16, 0.35),
        row("tuned", "reno", {"iterations": 3}, 64, 0.38)]


def test_frontier_amortises_training_and_flags_the_pareto_points():
    train = {"nfe": 21600.0}
    pts = {(p["model"], p["method"], json.dumps(p["options"])): p for p in sf.frontier(ROWS, train, 100)}
    tuned = pts[("tuned", "best-of-n", '{"n": 1}')]
    assert tuned["kind"] == "fine-tune" and tuned["nfe_per_image"] == 16 + 216.0
    assert pts[("tuned", "reno", '{"iterations": 3}')]["kind"] == "both"
    assert pts[("base", "best-of-n", '{"n": 1}')]["kind"] == "base" and pts[("base", "fk", '{"n": 4}')]["kind"] == \
        "steer"
    # at M = 100 the tuned model costs 232+ NFE per image: base best-of-4 (64 NFE) is Pareto-optimal, fk is not
    assert pts[("base", "best-of-n", '{"n": 4}')]["pareto"] and not pts[("base", "fk", '{"n": 4}')]["pareto"]
    assert tuned["pareto"] and pts[("tuned", "reno", '{"iterations": 3}')]["pareto"]
    far = {(p["model"], p["method"]): p for p in sf.frontier(ROWS, train, 10**6)}
    assert far[("tuned", "best-of-n")]["nfe_per_image"] == 16 + 0.0216
    assert not far[("base", "best-of-n")]["pareto"]  # the tuned model dominates once training is amortised


def test_equal_nfe_pairs_each_method_with_best_of_n_at_its_budget():
    eq, methods = sf.equal_nfe(ROWS)
    assert methods == ["fk", "reno"]
    base64 = next(e for e in eq if e["model"] == "base" and e["nfe"] == 64)
    assert base64["best_of_n"] == -0.08 and base64["methods"] == {"fk": -0.10, "reno": None}
    tuned16 = next(e for e in eq if e["model"] == "tuned" and e["nfe"] == 16)
    assert tuned16["methods"] == {"fk": None, "reno": None}


def test_report_section_renders_the_frontier(tmp_path):
    assert steer_section(tmp_path) == ""  # no benchmark on this run: no section
    report = {"command": "python benchmarks/steer_frontier.py", "n_images": 96, "train": {"nfe": 21600.0},
              "rows": ROWS, "frontier": {"1000": sf.frontier(ROWS, {"nfe": 21600.0}, 1000)}}
    (tmp_path / FRONTIER_FILE).write_text(json.dumps(report))
    html = steer_section(tmp_path)
    assert "<h2>Fine-tune, steer, or both</h2>" in html and "<svg" in html and "21600 NFE" in html
    assert html.count("<tr>") == 1 + sum(p["pareto"] for p in report["frontier"]["1000"])
    svg = frontier_svg(report, 1000)
    assert "steer base" in svg and "fine-tune + steer" in svg and "fine-tune alone" in svg
    (tmp_path / FRONTIER_FILE).write_text("{not json")
    assert steer_section(tmp_path) == ""

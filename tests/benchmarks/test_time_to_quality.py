"""benchmarks/time_to_quality.py: the crossing time against worked examples, the session planning, and a tiny end-to-end
run on the random-weight world whose JSON and table hold what the README's claim rests on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "time_to_quality.py"


@pytest.fixture(scope="module")
def ttq():
    spec = importlib.util.spec_from_file_location("time_to_quality_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pts(*rows):
    return [{"train_seconds": t, "relative": r, "fidelity": f} for t, r, f in rows]


def test_crossing_is_interpolated_between_points(ttq):
    # base relative -0.2; gains 0.1 at 10 s, 0.3 at 20 s; target gain 0.2 -> halfway: 15 s
    pts = _pts((10, -0.1, 0.99), (20, 0.1, 0.99))
    assert ttq.time_to_reach(pts, -0.2, 0.2, 0.95) == pytest.approx(15.0)
    # the first point already passes: interpolated from the base at 0 s (gain 0): 0.2 / 0.4 * 8 = 4 s
    assert ttq.time_to_reach(_pts((8, 0.2, 0.99)), -0.2, 0.2, 0.95) == pytest.approx(4.0)


def test_fidelity_must_hold_at_the_crossing(ttq):
    # the gain is reached at 10 s with low fidelity; fidelity recovers at 20 s: the time is 20 s, not earlier
    pts = _pts((10, 0.1, 0.90), (20, 0.12, 0.97))
    assert ttq.time_to_reach(pts, -0.2, 0.2, 0.95) == pytest.approx(20.0)
    assert ttq.time_to_reach(_pts((10, 0.1, 0.90)), -0.2, 0.2, 0.95) is None
    assert ttq.time_to_reach(_pts((10, -0.1, 0.99)), -0.2, 0.2, 0.95) is None  # never enough gain


def test_best_gain_counts_only_points_that_kept_fidelity(ttq):
    # base relative -0.2, floor 0.95: the 0.3-gain point lost fidelity (0.80), so 0.2 is the best
    pts = _pts((10, -0.1, 0.97), (20, 0.0, 0.955), (30, 0.1, 0.80))
    assert ttq.best_kept_gain(pts, -0.2, 0.95) == pytest.approx(0.2)
    assert ttq.best_kept_gain(_pts((10, 0.1, 0.5)), -0.2, 0.95) == 0.0  # none kept it


def test_session_steps_land_on_the_next_evaluation_time(ttq):
    assert ttq.next_session_steps(0.0, 0, 20.0) == 4  # nothing measured yet
    assert ttq.next_session_steps(2.0, 4, 20.0) == 36  # 0.5 s/step, 18 s to go
    assert ttq.next_session_steps(19.9, 40, 20.0) == 1  # at least one step


def test_every_arm_is_a_valid_srpo_config(ttq, tmp_path):
    for name, overrides in ttq.ARMS.items():
        cfg = ttq.run_config("srpo", 42, 10, tmp_path / name, [0], overrides)
        assert cfg.method == "srpo"
    official = ttq.run_config("srpo", 42, 10, tmp_path / "o", [0], ttq.ARMS["official"])
    assert (official.train.batch_size, official.srpo.rollout_steps, official.srpo.samples_per_rollout,
            official.srpo.rollout_reuse) == (1, 25, 1, 1)
    assert official.srpo.denoise_branch and official.srpo.inversion_branch


@pytest.mark.slow
def test_tiny_end_to_end_writes_the_table_and_json(ttq, random_world, tmp_path):
    out = tmp_path / "out"
    report = ttq.main(["--budget", "1", "--interval", "1", "--arms", "official,b1-r16-reuse4", "--eval-seeds", "0",
                       "--set", "eval.steps=3", "--out", str(out)], log=lambda *_: None)
    data = json.loads((out / "results.json").read_text())
    assert set(data["summary"]) == {"official", "b1-r16-reuse4"}
    for name, runs in data["runs"].items():
        pts = runs[0]["points"]
        assert pts and all(b["train_seconds"] > a["train_seconds"] for a, b in zip(pts, pts[1:])), name
        assert all(b["step"] > a["step"] for a, b in zip(pts, pts[1:])), name
    # the reuse arm spends a quarter of the rollout forwards per step: 16 * 1 / 4 no-grad and 2 * 1 grad per step
    last = data["runs"]["b1-r16-reuse4"][0]["points"][-1]
    assert last["nfe_grad"] == 2 * last["step"]
    assert last["nfe_no_grad"] == pytest.approx(4 * last["step"])
    assert data["machine"]["threads"] >= 1 and data["machine"]["cpu_model"]
    official = data["summary"]["official"]
    assert official["ratio_to_official"] in (None, pytest.approx(1.0))
    table = (out / "table.md").read_text()
    assert "| official |" in table and "| b1-r16-reuse4 |" in table
    assert (out / "gain_vs_seconds.svg").read_text().startswith("<svg")
    floor = data["base"]["fidelity"] - data["fidelity_tolerance"]
    best = ttq.best_kept_gain(data["runs"]["official"][0]["points"], data["base"]["relative"], floor)
    assert report["target"]["gain"] == pytest.approx(0.95 * best) and report["target"]["fidelity"] == floor
    assert all(p["relative_se"] > 0 for p in data["runs"]["official"][0]["points"])

"""benchmarks/compare_methods.py end to end on the random-weight tiny world with a tiny budget: every method, one
seed, two steps, through the same engine; the table, the JSON and the plot are written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

# The slow tier: the benchmark trains every method in worker processes.
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_methods.py"
TINY = ["eval.steps=2", "train.batch_size=2", "train.lora_rank=4", "train.lora_alpha=4",
        "srpo.rollout_steps=2", "srpo.grid_points=40", "srpo.window_margin=2",
        "refl.rollout_steps=3", "refl.step_range=[1,2]", "draft.sampling_steps=3",
        "alignprop.sampling_steps=3", "alignprop.gaussian=[1.0,0.5]",
        "grpo.sampling_steps=3", "grpo.group_size=2"]


def _load():
    spec = importlib.util.spec_from_file_location("compare_methods", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(out, *extra):
    args = ["--seeds", "1", "--steps", "all=2", "--eval-points", "2", "--eval-seeds", "0,1", "--out", str(out)]
    for s in TINY:
        args += ["--set", s]
    return args + list(extra)


def test_compare_methods_end_to_end(random_world, tmp_path):
    mod = _load()
    out = tmp_path / "out"
    report = mod.main(_args(out, "--in-process"), log=lambda *a: None)
    assert set(report["aggregates"]) == set(mod.METHODS)
    for m, runs in report["runs"].items():
        (run,) = runs
        assert run["steps"] == 2 and [p["step"] for p in run["points"]] == [1, 2]
        final = run["points"][-1]
        for key in ("reward", "relative", "fidelity", "saturation", "brightness", "colourfulness", "hf_energy",
                    "nfe_no_grad", "nfe_grad", "train_seconds"):
            assert final[key] is not None, (m, key)
        assert final["nfe_grad"] > 0 and final["train_seconds"] > 0 and run["peak_memory_mb"] > 0
    # the cost columns follow each recipe's NFE: DRaFT-LV (3 no-grad + 2 grad per sample) x 2 prompts x 2 steps
    lv = report["runs"]["draft-lv"][0]["points"][-1]
    assert (lv["nfe_no_grad"], lv["nfe_grad"]) == (12, 8)
    # GRPO: 2 prompts x group 2 x (3 rollout calls, int(2 * 0.6) = 1 trained) per rollout, and tiny-grpo reuses
    # each rollout for updates_per_rollout = 3 optimizer steps: its calls are spread evenly over them
    grpo = report["runs"]["grpo"][0]["points"][-1]
    assert (grpo["nfe_no_grad"], grpo["nfe_grad"]) == pytest.approx((2 * 12 / 3, 2 * 4 / 3))

    data = json.loads((out / "results.json").read_text())
    assert data["steps"] == {m: 2 for m in mod.METHODS}
    table = (out / "table.md").read_text()
    for label in mod.LABELS.values():
        assert f"| {label} | 2 |" in table
    assert "| Base model | 0 |" in table and "python benchmarks/compare_methods.py" in table
    svg = (out / "reward_vs_nfe.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == len(mod.METHODS)


def test_compare_methods_plans_from_the_budget_in_worker_processes(random_world, tmp_path):
    mod = _load()
    out = tmp_path / "out"
    args = ["--seeds", "1", "--methods", "refl", "--plan-only", "--eval-seeds", "0", "--out", str(out)]
    for s in TINY:
        args += ["--set", s]
    plan = mod.main(args + ["--budget-minutes", "5"], log=lambda *a: None)
    sps = plan["calibration"]["refl"]["seconds_per_step"]
    assert 0 < sps < 10
    assert plan["steps"]["refl"] == 150  # 5 minutes of tiny steps exceed the config's train.steps cap
    assert 0 < plan["estimate_minutes"] <= 5
    assert (out / "logs" / "calibrate-refl.log").exists()  # it ran in its own process
    # the cap and the budget arithmetic, in process
    plan = mod.main(args + ["--budget-minutes", "5", "--max-steps", "7", "--in-process"], log=lambda *a: None)
    assert plan["steps"]["refl"] == 7
    with pytest.raises(SystemExit, match="no training time"):
        mod.main(args + ["--budget-minutes", "0.01", "--in-process"], log=lambda *a: None)


def test_parse_steps_and_eval_points():
    mod = _load()
    assert mod.parse_steps(["all=5", "grpo=2"], ["srpo", "grpo"]) == {"srpo": 5, "grpo": 2}
    with pytest.raises(SystemExit):
        mod.parse_steps(["nope=3"], ["srpo"])
    assert mod.eval_points(10, 4) == [2, 5, 8, 10]
    assert mod.eval_points(2, 4) == [1, 2]

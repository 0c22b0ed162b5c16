"""benchmarks/compare_long.py and compare_reach.py: the plateau rule, the seed-mean curves, the NFE and seconds to
reach SRPO's final level and their ratios, the own-objective rise against the seed spread and the merge of chunks, on
worked examples with closed-form answers; and a tiny end-to-end run on the random-weight world (slow tier)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def reach():
    sys.path.insert(0, str(BENCH))
    return importlib.import_module("compare_reach")


@pytest.fixture(scope="module")
def long():
    sys.path.insert(0, str(BENCH))
    return importlib.import_module("compare_long")


# ------------------------------------------------------------------------------------------------ stop rule
def test_plateau_needs_patience_evaluations_without_a_delta_improvement(reach):
    # best 0.1 after the first evaluation; 0.105, 0.104, 0.106 are all within delta 0.01 of it
    vals = [0.0, 0.1, 0.105, 0.104, 0.106]
    assert reach.plateaued(vals, 0.01, 3) and not reach.plateaued(vals, 0.01, 4)
    assert not reach.plateaued([0.0, 0.1, 0.105, 0.2], 0.01, 2)  # the jump resets the count
    # small gains do not move the best: 0.006 is stale (best 0), 0.012 beats 0 by > 0.01, 0.018 is stale again
    creep = [0.0, 0.006, 0.012, 0.018]
    assert reach.plateaued(creep, 0.01, 1) and not reach.plateaued(creep, 0.01, 2)
    assert reach.plateaued([0.5, 0.4, 0.3], 0.0, 2)  # never above the base model


def test_stop_reason_plateau_first_then_cap(reach):
    flat = [0.0, 0.0, 0.0]
    assert reach.stop_reason(flat, 10.0, 5, 0.01, 2, cap_seconds=100.0) == "plateau"
    assert reach.stop_reason(flat, 500.0, 5, 0.01, 2, cap_seconds=100.0) == "plateau"  # both: plateau named
    rising = [0.0, 0.1, 0.2]
    assert reach.stop_reason(rising, 100.0, 5, 0.01, 2, cap_seconds=100.0) == "cap"
    assert reach.stop_reason(rising, 10.0, 5, 0.01, 2, cap_seconds=100.0, max_steps=5) == "cap"
    assert reach.stop_reason(rising, 10.0, 4, 0.01, 2, cap_seconds=100.0, max_steps=5) is None
    assert reach.stop_reason(rising, 10.0, 4, 0.01, 2, cap_seconds=100.0) is None
    # before min_seconds of training a flat run goes on; the cap still applies
    assert reach.stop_reason(flat, 10.0, 5, 0.01, 2, cap_seconds=100.0, min_seconds=60.0) is None
    assert reach.stop_reason(flat, 60.0, 5, 0.01, 2, cap_seconds=100.0, min_seconds=60.0) == "plateau"
    assert reach.stop_reason(flat, 10.0, 5, 0.01, 2, cap_seconds=5.0, min_seconds=60.0) == "cap"


# ---------------------------------------------------------------------------------------------------- curves
def test_first_reach_interpolates_between_points(reach):
    c = [(0.0, -0.2), (100.0, 0.0), (300.0, 0.2)]
    assert reach.first_reach(c, 0.1) == pytest.approx(200.0)  # 100 + (0.1 / 0.2) * 200
    assert reach.first_reach(c, -0.3) == 0.0  # the base model is already there
    assert reach.first_reach(c, 0.3) is None
    assert reach.first_reach([(0.0, 0.0), (10.0, 0.5), (20.0, 0.1)], 0.25) == pytest.approx(5.0)  # the first one
    assert reach.interp(c, 200.0) == pytest.approx(0.1) and reach.interp(c, 1e6) == 0.2


def test_mean_curve_holds_a_stopped_seed_at_its_last_value(reach):
    c1, c2 = [(0.0, 0.0), (10.0, 1.0)], [(0.0, 0.0), (20.0, 1.0)]
    # at 10: seed 1 = 1, seed 2 = 0.5 (interpolated); at 20: seed 1 held at 1, seed 2 = 1
    assert reach.mean_curve([c1, c2]) == [(0.0, 0.0), (10.0, pytest.approx(0.75)), (20.0, pytest.approx(1.0))]


def test_reach_ratio_to_srpos_own_crossing(reach):
    srpo = [(0.0, -0.2), (100.0, 0.0), (200.0, 0.2)]
    grpo = [(0.0, -0.2), (1000.0, 0.0), (3000.0, 0.4)]  # 0.2 at 1000 + 0.5 * 2000 = 2000
    never = [(0.0, -0.2), (5000.0, 0.1)]
    r = reach.reach({"srpo": srpo, "grpo": grpo, "nft": never})
    assert r["srpo"] == {"level": 0.2, "x": 200.0, "ref_x": 200.0, "ratio": 1.0}
    assert r["grpo"]["x"] == pytest.approx(2000.0) and r["grpo"]["ratio"] == pytest.approx(10.0)
    assert r["nft"]["x"] is None and r["nft"]["ratio"] is None
    # SRPO overshoots then falls back to 0.2: its own crossing is on the way up, 0.4 / 0.5 * 100 = 80
    r = reach.reach({"srpo": [(0.0, -0.2), (100.0, 0.3), (200.0, 0.2)], "grpo": grpo})
    assert r["srpo"]["ref_x"] == pytest.approx(80.0) and r["grpo"]["ratio"] == pytest.approx(2000.0 / 80.0)
    # SRPO ends below its base model: its own x is 0, so no ratio exists (GRPO still reaches 0.4 at 3000)
    r = reach.reach({"srpo": [(0.0, 0.5), (100.0, 0.4)], "grpo": grpo})
    assert r["srpo"]["ref_x"] == 0.0 and r["grpo"]["x"] == pytest.approx(3000.0) and r["grpo"]["ratio"] is None
    assert reach.reach({"grpo": grpo}) == {}  # no SRPO, no reference


def test_srpo_result_is_its_best_relative_point_that_kept_fidelity(reach):
    rel = [(0.0, -0.2), (10.0, 0.1), (20.0, 0.3), (30.0, 0.5)]
    fid = [(0.0, 0.96), (10.0, 0.97), (20.0, 0.96), (30.0, 0.80)]
    assert reach.result_point(rel, fid, 0.96) == (2, True)  # 0.5 lost fidelity; 0.3 sits on the floor
    assert reach.result_point(rel, [(x, 0.9) for x, _ in fid], 0.96) == (3, False)  # none kept it: the last
    assert reach.result_point(rel, fid, 0.99) == (3, False)  # the base point itself never counts


def test_analysis_reads_srpos_level_before_it_lost_fidelity(reach):
    methods = _methods()
    late = _pt(30, 300, 30, 0.6, 0.80, 0.2)  # SRPO's last point: more texture, fidelity gone
    for run in methods["srpo"]["runs"]:
        run["points"] = run["points"] + [late]
    a = reach.analyse(_report(methods))
    assert a["srpo_result"] == {"nfe": 200.0, "fidelity_floor": 0.96, "kept_fidelity": True,
                                "relative": pytest.approx(0.2), "fidelity": pytest.approx(0.98)}
    rel = a["reach"]["relative/nfe"]
    assert rel["srpo"]["level"] == pytest.approx(0.2) and rel["grpo"]["ratio"] == pytest.approx(10.0)
    assert "no point kept" not in reach.markdown(_report(methods), a)
    # 95 % of SRPO's gain over its base -0.2: -0.2 + 0.95 * 0.4 = 0.18; SRPO crosses it at 100 + 0.9 * 100 = 190,
    # GRPO at 1000 + (0.18 / 0.4) * 2000 = 1900: 10x
    near = a["reach"]["relative_near/nfe"]
    assert near["srpo"]["level"] == pytest.approx(0.18) and near["srpo"]["x"] == pytest.approx(190.0)
    assert near["grpo"]["x"] == pytest.approx(1900.0) and near["grpo"]["ratio"] == pytest.approx(10.0)


def test_objective_rise_against_two_seed_spreads(reach):
    o = reach.objective_rise(0.5, [0.6, 0.62, 0.64])  # rise 0.12, std 0.02
    assert (o["rise"], o["spread"], o["rose"]) == (pytest.approx(0.12), pytest.approx(0.02), True)
    o = reach.objective_rise(0.5, [0.5, 0.6, 0.7])  # rise 0.1, std 0.1: 0.1 < 0.2
    assert (o["rise"], o["spread"], o["rose"]) == (pytest.approx(0.1), pytest.approx(0.1), False)
    assert reach.objective_rise(0.5, [0.9])["rose"] is None  # one seed cannot be judged


# ------------------------------------------------------------------------------------- analysis and merging
DRIFT = {"brightness": 0.5, "saturation": 0.7, "colourfulness": 0.5, "hf_energy": 0.001, "diversity_pixel": 0.15}


def _pt(step, nfe, secs, rel, fid, own):
    return {"step": step, "nfe_no_grad": 0.75 * nfe, "nfe_grad": 0.25 * nfe, "train_seconds": secs,
            "relative": rel, "fidelity": fid, "own_objective": own, "reward": 0.7 + rel / 10,
            "dark_share": max(rel, 0.0) / 2, **DRIFT}


def _report(methods, eval_seeds=(0, 1), base_rel=-0.2):
    base = {"reward": 0.68, "relative": base_rel, "fidelity": 0.96, "own_objective": None, "dark_share": 0.0,
            **DRIFT}
    return {"kind": "compare_long", "command": "python benchmarks/compare_long.py x", "started": "now",
            "total_seconds": 60.0, "eval_seeds": list(eval_seeds), "train_seeds": [42, 43],
            "machine": {"platform": "p", "cpus": 2, "torch": "t", "threads": 2, "device": "cpu"},
            "settings": {"eval_every_seconds": 10, "plateau_delta": 0.01, "plateau_patience": 2, "cap_minutes": 1},
            "base": base, "methods": methods}


def _methods():
    def entry(own0, runs):
        return {"base": {"reward": 0.68, "relative": -0.2, "fidelity": 0.96, "own_objective": own0, "dark_share": 0.0,
                         **DRIFT},
                "runs": [{"seed": 42 + i, "points": p, "stop_reason": s, "peak_memory_mb": 600.0}
                         for i, (p, s) in enumerate(runs)]}

    srpo = [_pt(10, 100, 10, 0.0, 0.97, -0.05), _pt(20, 200, 20, 0.2, 0.98, 0.05)]
    grpo = [_pt(5, 1000, 50, 0.0, 0.95, 0.70), _pt(15, 3000, 150, 0.4, 0.96, 0.72)]
    return {"srpo": entry(-0.2, [(srpo, "plateau"), (srpo, "cap")]),
            "grpo": entry(0.68, [(grpo, "cap"), ([dict(p, own_objective=p["own_objective"] + 0.02) for p in grpo],
                                                 "cap")])}


def test_analysis_gives_the_closed_form_ratios(reach):
    a = reach.analyse(_report(_methods()))
    rel_nfe, rel_s, fid_nfe = a["reach"]["relative/nfe"], a["reach"]["relative/seconds"], a["reach"]["fidelity/nfe"]
    assert rel_nfe["srpo"]["level"] == pytest.approx(0.2) and rel_nfe["srpo"]["x"] == pytest.approx(200.0)
    assert rel_nfe["grpo"]["x"] == pytest.approx(2000.0) and rel_nfe["grpo"]["ratio"] == pytest.approx(10.0)
    # seconds: SRPO at 20 s, GRPO at 50 + 0.5 * 100 = 100 s
    assert rel_s["grpo"]["x"] == pytest.approx(100.0) and rel_s["grpo"]["ratio"] == pytest.approx(5.0)
    assert fid_nfe["srpo"]["x"] == pytest.approx(200.0) and fid_nfe["grpo"]["x"] is None  # GRPO ends at 0.96
    # own objective: GRPO finals 0.72 and 0.74 over base 0.68: rise 0.05, 2 x std = 2 * 0.01414 = 0.0283 -> yes
    assert a["objective"]["grpo"]["rise"] == pytest.approx(0.05) and a["objective"]["grpo"]["rose"] is True
    assert a["objective"]["srpo"]["spread"] == 0.0 and a["objective"]["srpo"]["rose"] is True
    assert a["stops"]["srpo"] == ["plateau", "cap"]
    # a drift curve: the base point, then the seed mean of GRPO's dark share (0, 0.2 and 0, 0.2) at its NFE
    assert a["curves"]["grpo"]["dark_share/nfe"] == [(0.0, 0.0), (1000, 0.0), (3000, pytest.approx(0.2))]
    assert a["curves"]["grpo"]["hf_energy/seconds"] == [(0.0, 0.001), (50, 0.001), (150, 0.001)]


def _rows(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("| ")]


def test_merge_of_chunks_gives_the_combined_table(reach, tmp_path):
    methods = _methods()
    combined = _report(methods)
    chunks = [_report({"srpo": methods["srpo"]}), _report({"grpo": methods["grpo"]})]
    merged = reach.merge(chunks, ["a", "b"])
    assert list(merged["methods"]) == ["srpo", "grpo"]
    assert _rows(reach.markdown(merged, reach.analyse(merged))) == _rows(reach.markdown(combined,
                                                                                      reach.analyse(combined)))
    with pytest.raises(reach.CompareError, match="eval seeds"):
        reach.merge([chunks[0], _report({"grpo": methods["grpo"]}, eval_seeds=(0,))], ["a", "b"])
    with pytest.raises(reach.CompareError, match="base model has relative"):
        reach.merge([chunks[0], _report({"grpo": methods["grpo"]}, base_rel=-0.1)], ["a", "b"])
    with pytest.raises(reach.CompareError, match="more than one chunk"):
        reach.merge([chunks[0], chunks[0]], ["a", "b"])
    with pytest.raises(reach.CompareError, match="does not exist"):
        reach.read_report(tmp_path)
    a = reach.write_outputs(merged, tmp_path / "out")
    assert a["reach"]["relative/nfe"]["grpo"]["ratio"] == pytest.approx(10.0)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "## Compute to reach SRPO's level" in table and "| DanceGRPO | 2,000 (10.00x) | 100.0 (5.00x) | - |" in table
    assert len(list((tmp_path / "out").glob("*_vs_*.svg"))) == 2 * len(reach.CURVE_METRICS) == 18
    dark = (tmp_path / "out" / "dark_share_vs_nfe.svg").read_text()
    assert "dark share (analytic judge)" in dark and "DanceGRPO" in dark
    assert "![dark share (analytic judge) against NFE](dark_share_vs_nfe.svg)" in table


def test_arguments_quick_and_errors(long):
    args = long.parse_args(["--quick", "--out", "o"])
    assert args.methods == list(long.QUICK_METHODS) and (args.seeds, args.cap_minutes, args.min_minutes) == (1, 2, 1)
    assert long.parse_args(["--quick", "--methods", "grpo", "--out", "o"]).methods == ["grpo"]
    with pytest.raises(long.CompareError, match="--out"):
        long.parse_args(["--methods", "srpo"])
    with pytest.raises(long.CompareError, match="unknown"):
        long.parse_args(["--methods", "srpo,nope", "--out", "o"])


def test_config_check_refuses_a_schedule_that_depends_on_train_steps(long, tmp_path):
    long.check_config("srpo", [0], [], tmp_path)  # the shipped config fits
    with pytest.raises(long.CompareError, match="lr_schedule=cosine"):
        long.check_config("srpo", [0], ["train.lr_schedule=cosine"], tmp_path)
    with pytest.raises(long.CompareError, match="log_every"):
        long.check_config("grpo", [0], ["run.log_every=5"], tmp_path)


# ------------------------------------------------------------------------------------------------ end to end
TINY = ["eval.steps=2", "train.batch_size=2", "train.lora_rank=4", "train.lora_alpha=4", "srpo.rollout_steps=2",
        "srpo.grid_points=40", "srpo.window_margin=2", "grpo.sampling_steps=3", "grpo.group_size=2"]


def _run(long, out, methods, *extra, in_process=True):
    args = ["--methods", methods, "--seeds", "1", "--eval-seeds", "0,1", "--out", str(out)]
    args += ["--in-process"] if in_process else []
    for s in TINY:
        args += ["--set", s]
    return long.main(args + list(extra), log=lambda *a: None)


def _fixed_rows(table: str) -> list[str]:
    """Table rows without the columns measured in seconds or memory (they differ from run to run)."""
    rows = []
    for line in _rows(table):
        cells = line.split(" | ")
        if len(cells) == 18:  # the finals table: drop Train s and Peak MB
            cells = cells[:16]
        elif len(cells) == 7 and "train s" not in line:  # the reach table: drop the three seconds columns
            cells = [cells[0], cells[1], cells[3], cells[5]]
        rows.append(" | ".join(cells))
    return rows


@pytest.mark.slow
def test_tiny_end_to_end_stops_records_and_merges(long, random_world, tmp_path):
    fixed = ["--session-steps", "1", "--max-steps", "2", "--plateau-patience", "3", "--cap-minutes", "100"]
    report = _run(long, tmp_path / "both", "srpo,grpo", *fixed)
    data = json.loads((tmp_path / "both" / "results.json").read_text())
    for m in ("srpo", "grpo"):
        (run,) = data["methods"][m]["runs"]
        assert run["stop_reason"] == "cap" and [p["step"] for p in run["points"]] == [1, 2]
        for key in ("nfe_no_grad", "nfe_grad", "train_seconds", "reward", "relative", "own_objective", "fidelity",
                    "saturation", "brightness", "colourfulness", "hf_energy", "diversity_pixel", "judge"):
            assert run["points"][-1][key] is not None, (m, key)
        assert run["points"][1]["nfe_grad"] > run["points"][0]["nfe_grad"] > 0
        assert run["points"][1]["train_seconds"] > run["points"][0]["train_seconds"] > 0
        assert data["methods"][m]["base"]["own_objective"] is not None
    assert set(data["analysis"]["reach"]["relative/nfe"]) == {"srpo", "grpo"}
    assert report["base"]["relative"] == pytest.approx(data["methods"]["grpo"]["base"]["relative"], abs=1e-5)

    _run(long, tmp_path / "srpo", "srpo", *fixed)
    _run(long, tmp_path / "grpo", "grpo", *fixed)
    long.main(["--merge", str(tmp_path / "srpo"), str(tmp_path / "grpo"), "--out", str(tmp_path / "merged")],
              log=lambda *a: None)
    merged = (tmp_path / "merged" / "table.md").read_text()
    assert _fixed_rows(merged) == _fixed_rows((tmp_path / "both" / "table.md").read_text())
    assert "compare_long.py --methods srpo " in merged and "compare_long.py --methods grpo " in merged

    # a plateau: no evaluation can beat the base's own objective by 10; the workers in their own processes
    r = _run(long, tmp_path / "plateau", "grpo", "--session-steps", "1", "--plateau-delta", "10",
             "--plateau-patience", "1", "--min-minutes", "0", in_process=False)
    assert [(x["stop_reason"], len(x["points"])) for x in r["methods"]["grpo"]["runs"]] == [("plateau", 1)]
    assert r["methods"]["grpo"]["runs"][0]["peak_memory_mb"] > 0
    assert {p.name for p in (tmp_path / "plateau" / "logs").iterdir()} == {"base-grpo.log", "run-grpo-seed42.log"}
    # the time cap: 0.06 s of training is over after the first session (4 steps before any time is measured)
    r = _run(long, tmp_path / "cap", "srpo", "--cap-minutes", "0.001", "--eval-every-seconds", "0.01")
    (run,) = r["methods"]["srpo"]["runs"]
    assert run["stop_reason"] == "cap" and [p["step"] for p in run["points"]] == [4]


def test_flow_grpo_is_a_variant_of_grpo_with_its_own_config(long):
    """``flow-grpo`` runs method grpo from tiny-flow-grpo.yaml and takes the grpo section's --set overrides."""
    cm = importlib.import_module("compare_methods")
    assert "flow-grpo" in cm.METHODS and cm.registered_method("flow-grpo") == "grpo"
    sets = ["grpo.eta=0.5", "srpo.rollout_steps=4", "train.learning_rate=1e-4"]
    assert cm.own_overrides("flow-grpo", sets) == ["grpo.eta=0.5", "train.learning_rate=1e-4"]
    assert cm.own_overrides("srpo", sets) == ["srpo.rollout_steps=4", "train.learning_rate=1e-4"]
    cfg = cm.run_config("flow-grpo", 43, 7, Path("/tmp/unused-run"), [0], sets)
    g = cfg.method_section
    assert (cfg.method, g.sde, g.schedule, g.group_size, g.eta) == ("grpo", "flow", "diffusers", 8, 0.5)
    assert (cfg.train.seed, cfg.train.steps, cfg.train.learning_rate) == (43, 7, 1e-4)

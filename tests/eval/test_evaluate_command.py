"""``directalign eval`` on a 2-step run of the random-weight tiny world (directalign.eval.evaluate, .scoring,
.settings, .images), and the one-line user errors of every evaluation command (directalign.cli.eval)."""

import csv
import json
import math

import numpy as np
import pytest


def test_eval_reproduces_the_run_summary(random_world, tiny_run, tmp_path, cli):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert abs(summary["reward_after"] - summary["reward_before"]) > 1e-4  # the run moved the reward

    code, out, _ = cli(["eval", "--model", tiny_run, "--out", tmp_path / "after"])
    assert code == 0
    after = json.loads((tmp_path / "after" / "aggregate.json").read_text())
    assert after["reward"] == pytest.approx(summary["reward_after"], abs=1e-7)
    assert after["judge"] == pytest.approx(summary["judge_after"])
    assert "reward (training definition)" in out

    code, _, _ = cli(["eval", "--model", "base", "--config", tiny_run / "config.yaml", "--out",
                      tmp_path / "before", "--no-images"])
    assert code == 0
    before = json.loads((tmp_path / "before" / "aggregate.json").read_text())
    assert before["reward"] == pytest.approx(summary["reward_before"], abs=1e-7)
    assert before["judge"] == pytest.approx(summary["judge_before"])

    # per-image files: one row per held-out prompt x seed, with every metric
    with open(tmp_path / "after" / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["eval_prompts"] * len(summary["eval_seeds"]) == after["n_images"]
    assert {"prompt", "seed", "train_reward", "tiny-world.score", "tiny-world.relative", "saturation",
            "brightness", "colourfulness", "hf_energy"} <= set(rows[0])
    per = json.loads((tmp_path / "after" / "per_image.json").read_text())
    assert np.mean([r["train_reward"] for r in per]) == pytest.approx(summary["reward_after"], abs=1e-6)
    m = after["metrics"]["tiny-world.relative"]
    assert m["ci95_low"] <= m["mean"] <= m["ci95_high"]
    assert after["rewards"]["tiny-world"]["relative_words"] == ["textured", "flat"]
    # the images folder can be re-scored without the model
    assert len((tmp_path / "after" / "images" / "manifest.jsonl").read_text().splitlines()) == after["n_images"]
    code, _, _ = cli(["eval", "--images", tmp_path / "after" / "images", "--out", tmp_path / "rescored"])
    assert code == 0
    rescored = json.loads((tmp_path / "rescored" / "aggregate.json").read_text())
    assert rescored["reward"] == pytest.approx(after["reward"], abs=2e-3)  # 8-bit PNG round trip


def test_eval_with_baseline_and_several_rewards(random_world, tiny_run, tmp_path, cli):
    clip_dir = random_world / "reward"  # any transformers CLIP directory
    code, out, _ = cli(["eval", "--model", tiny_run, "--baseline", "base", "--seeds", "0", "1", "--rewards",
                        f"train,clip:{clip_dir}", "--out", tmp_path / "e", "--no-images"])
    assert code == 0
    agg = json.loads((tmp_path / "e" / "aggregate.json").read_text())
    assert agg["n_images"] == 48
    clip_name = f"clip-{clip_dir.name}"
    assert agg["rewards"][clip_name]["relative_words"] == ["Realistic photo", "CG Render"]
    assert {"train_reward", "tiny-world.score", f"{clip_name}.score", f"{clip_name}.relative"} <= set(agg["metrics"])
    assert math.isfinite(agg["diversity"]["pixel"]) and agg["diversity"]["pixel"] > 0  # two seeds per prompt
    assert f"{clip_name}.embedding" in agg["diversity"]
    base = agg["baseline"]
    assert base["delta"]["reward"] == pytest.approx(agg["reward"] - base["reward"])
    assert base["delta"]["saturation"] == pytest.approx(agg["metrics"]["saturation"]["mean"]
                                                        - base["metrics"]["saturation"])
    assert isinstance(base["warnings"], list)
    assert (tmp_path / "e" / "baseline" / "aggregate.json").is_file()
    assert "vs baseline base" in out


def test_user_errors_exit_2_with_one_line(random_world, tmp_path, cli):
    cases = [
        ["eval", "--model", tmp_path / "missing"],
        ["eval"],
        ["eval", "--model", "tiny-world", "--rewards", "hps", "--out", tmp_path / "x"],
        ["eval", "--model", "tiny-world", "--rewards", f"clip:{tmp_path / 'nope'}", "--out", tmp_path / "y"],
        ["report", tmp_path],
        ["compare", "tiny-world"],
        ["sample", "--model", "tiny-world", "--prompts", "general:sculpture", "--out", tmp_path / "z"],
    ]
    for argv in cases:
        code, _, err = cli(argv)
        assert code == 2, argv
        assert len(err.strip().splitlines()) == 1 and err.startswith("directalign: error:"), (argv, err)

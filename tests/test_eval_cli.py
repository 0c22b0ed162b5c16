"""`directalign sample | eval | compare | report` on a 2-step run of the random-weight tiny world."""

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from directalign.cli import main
from directalign.eval_cli import mean_ci, t_quantile_975
from directalign.metrics import drift_warnings

RUN_SETTINGS = ["train.steps=2", "train.batch_size=2", "srpo.rollout_steps=2", "eval.seeds=[0]", "eval.steps=2",
                "eval.best_of=1", "run.progress=false", "train.learning_rate=1e-2"]


@pytest.fixture(scope="module")
def tiny_run(random_world_dir, tmp_path_factory):
    """A finished 2-step SRPO + LoRA run on the random world (learning rate high enough to move the reward)."""
    from directalign.config import build_config
    from directalign.training import train

    out = tmp_path_factory.mktemp("eval-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIRECTALIGN_WORLD_DIR", str(random_world_dir))
        mp.setenv("HF_HUB_OFFLINE", "1")
        cfg = build_config({}, [f"run.output_dir={out}", *RUN_SETTINGS])
        train(cfg, log=lambda *_: None)
    return out


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_reproduces_the_run_summary(random_world, tiny_run, tmp_path, capsys):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert abs(summary["reward_after"] - summary["reward_before"]) > 1e-4  # the run moved the reward

    code, out, _ = run_cli(["eval", "--model", tiny_run, "--out", tmp_path / "after"], capsys)
    assert code == 0
    after = json.loads((tmp_path / "after" / "aggregate.json").read_text())
    assert after["reward"] == pytest.approx(summary["reward_after"], abs=1e-7)
    assert after["judge"] == pytest.approx(summary["judge_after"])
    assert "reward (training definition)" in out

    code, _, _ = run_cli(["eval", "--model", "base", "--config", tiny_run / "config.yaml", "--out",
                          tmp_path / "before", "--no-images"], capsys)
    assert code == 0
    before = json.loads((tmp_path / "before" / "aggregate.json").read_text())
    assert before["reward"] == pytest.approx(summary["reward_before"], abs=1e-7)
    assert before["judge"] == pytest.approx(summary["judge_before"])

    # per-image files: one row per held-out prompt x seed, with every metric
    rows = list(csv.DictReader(open(tmp_path / "after" / "per_image.csv")))
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
    code, _, _ = run_cli(["eval", "--images", tmp_path / "after" / "images", "--out", tmp_path / "rescored"], capsys)
    assert code == 0
    rescored = json.loads((tmp_path / "rescored" / "aggregate.json").read_text())
    assert rescored["reward"] == pytest.approx(after["reward"], abs=2e-3)  # 8-bit PNG round trip


def test_eval_with_baseline_and_several_rewards(random_world, tiny_run, tmp_path, capsys):
    clip_dir = random_world / "reward"  # any transformers CLIP directory
    code, out, _ = run_cli(["eval", "--model", tiny_run, "--baseline", "base", "--seeds", "0", "1", "--rewards",
                            f"train,clip:{clip_dir}", "--out", tmp_path / "e", "--no-images"], capsys)
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


def test_sample_manifest_regenerates_each_image(random_world, tiny_run, tmp_path, capsys):
    code, _, _ = run_cli(["sample", "--model", tiny_run, "--prompts", "tiny-world:heldout", "--seeds", "3", "7",
                          "--steps", "2", "--out", tmp_path / "s"], capsys)
    assert code == 0
    lines = [json.loads(x) for x in (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 48 and (tmp_path / "s" / "grid.png").is_file()
    rec = lines[5]
    assert {"file", "prompt", "seed", "steps", "guidance", "shift", "height", "width", "model"} <= set(rec)
    assert rec["seed"] == 7 and rec["steps"] == 2 and rec["model"] == str(tiny_run.resolve())
    # regenerate that one image alone from its manifest line
    p = tmp_path / "one.txt"
    p.write_text(rec["prompt"] + "\n")
    code, _, _ = run_cli(["sample", "--model", rec["model"], "--prompts", p, "--seeds", rec["seed"], "--steps",
                          rec["steps"], "--guidance", rec["guidance"], "--shift", rec["shift"], "--out",
                          tmp_path / "again"], capsys)
    assert code == 0
    a = np.asarray(Image.open(tmp_path / "s" / rec["file"])).astype(int)
    b = np.asarray(Image.open(tmp_path / "again" / "00000.png")).astype(int)
    assert np.abs(a - b).max() <= 1
    # existing output needs --overwrite
    code, _, err = run_cli(["sample", "--model", "tiny-world", "--steps", "1", "--out", tmp_path / "s"], capsys)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_compare_table(random_world, tiny_run, tmp_path, capsys):
    code, _, _ = run_cli(["eval", "--model", "base", "--config", tiny_run / "config.yaml", "--out", tmp_path / "b",
                          "--no-images"], capsys)
    assert code == 0
    code, out, _ = run_cli(["compare", tmp_path / "b", tiny_run, "--out", tmp_path / "cmp"], capsys)
    assert code == 0
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["columns"][:2] == ["model", "reward"]
    assert [r[0] for r in data["rows"]] == ["base", tiny_run.name]
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert data["rows"][0][1] == pytest.approx(summary["reward_before"], abs=1e-7)
    assert data["rows"][1][1] == pytest.approx(summary["reward_after"], abs=1e-7)
    rows = list(csv.reader(open(tmp_path / "cmp" / "compare.csv")))
    assert rows[0] == data["columns"] and len(rows) == 3
    assert "saturation" in out and tiny_run.name in out


def test_report_html_is_self_contained(random_world, tiny_run, tmp_path, capsys):
    from directalign.report import write_report

    path = write_report(tiny_run)
    assert path == tiny_run / "report.html"
    text = path.read_text()
    assert text.count('<svg class="plot"') == 4
    n_prompts = json.loads((tiny_run / "summary.json").read_text())["eval_prompts"]
    assert text.count('src="data:image/png;base64,') == 2 * n_prompts
    assert "<script" not in text.lower()
    for attr in ("src=", "href="):
        for chunk in text.split(attr)[1:]:
            assert chunk[1:].startswith("data:"), chunk[:80]
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text
    for key in ("saturation", "brightness", "colourfulness", "hf_energy", "diversity_pixel", "textured_share"):
        assert key in text
    code, out, _ = run_cli(["report", tiny_run, "--out", tmp_path / "r.html"], capsys)
    assert code == 0 and (tmp_path / "r.html").is_file()


def test_report_warns_on_drift(tmp_path):
    """A fabricated run whose 'after' samples are saturated red: the report says so."""
    from directalign.config import build_config
    from directalign.report import render_report
    from directalign.report_images import save_grid
    import torch

    cfg = build_config({}, ["eval.seeds=[0,1]"])
    run = tmp_path / "fake"
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    n = 24 * 2
    g = torch.Generator().manual_seed(0)
    before = 0.4 + 0.2 * torch.rand(n, 3, 32, 32, generator=g)
    after = torch.zeros(n, 3, 32, 32)
    after[:, 0] = 1.0
    save_grid(before, run / "samples" / "before.png", ncol=8)
    save_grid(after, run / "samples" / "after.png", ncol=8)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 / i, "reward": 0.1 * i,
                                                           "grad_norm": float("nan") if i == 2 else 1.0,
                                                           "step_seconds": 0.5}) + "\n" for i in range(1, 6)))
    text = render_report(run)
    assert 'class="warn"' in text and "saturation moved by" in text and "diversity_pixel fell by" in text
    assert "No summary.json" in text
    assert text.count('<svg class="plot"') == 4


def test_user_errors_exit_2_with_one_line(random_world, tmp_path, capsys):
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
        code, _, err = run_cli(argv, capsys)
        assert code == 2, argv
        assert len(err.strip().splitlines()) == 1 and err.startswith("directalign: error:"), (argv, err)


def test_statistics_and_drift_rules():
    assert t_quantile_975(1) == pytest.approx(12.706)
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=1e-3)
    assert t_quantile_975(10_000) == pytest.approx(1.96, abs=1e-3)
    s = mean_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
    assert s["ci95_high"] - 2.0 == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert mean_ci([5.0])["ci95_low"] is None and mean_ci([])["mean"] is None
    base = {"saturation": 0.40, "brightness": 0.5, "colourfulness": 0.20, "hf_energy": 0.010, "diversity_pixel": 0.2}
    assert drift_warnings(base, dict(base)) == []
    moved = dict(base, saturation=0.55, hf_energy=0.02, diversity_pixel=0.1)
    w = drift_warnings(base, moved)
    assert [x.split()[0] for x in w] == ["saturation", "hf_energy", "diversity_pixel"]
    assert drift_warnings(base, dict(base, diversity_pixel=0.5)) == []  # more diversity is no warning
    assert drift_warnings(base, dict(base, saturation=float("nan"))) == []

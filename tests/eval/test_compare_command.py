"""``directalign compare``: the side-by-side table of an eval directory and a run (directalign.eval.compare)."""

import csv
import json

import pytest


def test_compare_table(random_world, tiny_run, tmp_path, cli):
    code, _, _ = cli(["eval", "--model", "base", "--config", tiny_run / "config.yaml", "--out", tmp_path / "b",
                      "--no-images"])
    assert code == 0
    code, out, _ = cli(["compare", tmp_path / "b", tiny_run, "--out", tmp_path / "cmp"])
    assert code == 0
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data["columns"][:2] == ["model", "reward"]
    assert [r[0] for r in data["rows"]] == ["base", tiny_run.name]
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert data["rows"][0][1] == pytest.approx(summary["reward_before"], abs=1e-7)
    assert data["rows"][1][1] == pytest.approx(summary["reward_after"], abs=1e-7)
    with open(tmp_path / "cmp" / "compare.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == data["columns"] and len(rows) == 3
    assert "saturation" in out and tiny_run.name in out

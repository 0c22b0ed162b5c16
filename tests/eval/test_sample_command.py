"""``directalign sample``: images plus a manifest.jsonl whose every line regenerates its image
(directalign.eval.images)."""

import json

import numpy as np
from PIL import Image


def test_sample_manifest_regenerates_each_image(random_world, tiny_run, tmp_path, cli):
    code, _, _ = cli(["sample", "--model", tiny_run, "--prompts", "tiny-world:heldout", "--seeds", "3", "7",
                      "--steps", "2", "--out", tmp_path / "s"])
    assert code == 0
    lines = [json.loads(x) for x in (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 48 and (tmp_path / "s" / "grid.png").is_file()
    rec = lines[5]
    assert {"file", "prompt", "seed", "steps", "guidance", "shift", "height", "width", "model"} <= set(rec)
    assert rec["seed"] == 7 and rec["steps"] == 2 and rec["model"] == str(tiny_run.resolve())
    # regenerate that one image alone from its manifest line
    p = tmp_path / "one.txt"
    p.write_text(rec["prompt"] + "\n")
    code, _, _ = cli(["sample", "--model", rec["model"], "--prompts", p, "--seeds", rec["seed"], "--steps",
                      rec["steps"], "--guidance", rec["guidance"], "--shift", rec["shift"], "--out",
                      tmp_path / "again"])
    assert code == 0
    a = np.asarray(Image.open(tmp_path / "s" / rec["file"])).astype(int)
    b = np.asarray(Image.open(tmp_path / "again" / "00000.png")).astype(int)
    assert np.abs(a - b).max() <= 1
    # existing output needs --overwrite
    code, _, err = cli(["sample", "--model", "tiny-world", "--steps", "1", "--out", tmp_path / "s"])
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1

"""What a user is told about a partial YAML (the built-in defaults are FLUX.1-dev's, not the tiny job's) and what the
README's "Using it" section covers."""

from __future__ import annotations

import re

import pytest
import yaml
from helpers import REPO

from directalign.cli import main
from directalign.config import Config, load_config, packaged_config
from directalign.config_sources import annotated_yaml, defaults_notice, given_keys


def _lines(out: str) -> dict[str, str]:
    """``{"section.key": comment}`` of the key lines of an annotated config (leaves only)."""
    marks, section = {}, None
    for line in out.splitlines():
        m = re.match(r"^(\s*)([\w-]+):[^#]*(?:#\s*(.*))?$", line)
        if not m or line.startswith("#"):
            continue
        if not m.group(1):
            section = m.group(2)
            if m.group(3):
                marks[section] = m.group(3)
        elif len(m.group(1)) == 2 and m.group(3):
            marks[f"{section}.{m.group(2)}"] = m.group(3)
    return marks


def test_print_config_marks_where_each_key_comes_from(tmp_path, capsys):
    f = tmp_path / "my.yaml"
    f.write_text("train:\n  steps: 50\n", encoding="utf-8")
    assert main(["train", "--config", str(f), "--set", "srpo.window=[10,25]", "--print-config"]) == 0
    out = capsys.readouterr().out
    tiny = load_config(packaged_config("tiny-srpo"))
    marks = _lines(out)
    assert marks["train.steps"] == "my.yaml"
    assert marks["srpo.window"] == "--set"
    assert marks["method"] == "default"
    assert marks["train.seed"] == "default"  # the same as the tiny job's: no comparison
    # the defaults that are FLUX's, not the tiny job's, name the tiny job's value
    assert marks["train.batch_size"] == f"default; tiny-srpo: {tiny.train.batch_size}"
    assert marks["train.learning_rate"] == f"default; tiny-srpo: {tiny.train.learning_rate}"
    assert marks["srpo.rollout_guidance"] == f"default; tiny-srpo: {tiny.srpo.rollout_guidance}"
    header = " ".join(line[2:] for line in out.splitlines() if line.startswith("# "))
    assert "FLUX.1-dev settings of the official code" in header and "NOT the tiny job's" in header
    assert "directalign train --config tiny-srpo --print-config > my.yaml" in header
    # still the same YAML: it loads back to the same config
    assert yaml.safe_load(out) == load_config(f, ["srpo.window=[10,25]"]).to_dict()


def test_every_key_of_a_shipped_job_comes_from_its_file(capsys):
    """A whole shipped job printed and saved is a complete YAML: no key is left to the defaults, so a run from it
    gives no notice."""
    assert main(["train", "--config", "flux-dev-srpo-hpsv2", "--print-config"]) == 0
    marks = _lines(capsys.readouterr().out)
    assert marks["model.path"] == marks["train.learning_rate"] == "flux-dev-srpo-hpsv2.yaml"
    assert marks["model.device"] == "default"  # not in the file; no tiny job to compare against (FLUX model)
    assert not [m for m in marks.values() if "tiny-" in m]


def test_a_partial_yaml_run_names_the_defaults_that_are_not_the_tiny_jobs(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("train:\n  steps: 50\n", encoding="utf-8")
    note = defaults_notice(load_config(f), f)
    tiny = load_config(packaged_config("tiny-srpo"))
    assert note.startswith("note: my.yaml leaves keys unset; their built-in defaults are FLUX.1-dev's")
    assert f"srpo.rollout_guidance=1.0 (tiny-srpo: {tiny.srpo.rollout_guidance!r})" in note
    assert re.search(r" and \d+ more;", note)
    assert f"--config {f} --print-config" in note and "\n" not in note
    # a shipped config, a FLUX config or a complete copy of the tiny job: nothing to say
    assert defaults_notice(load_config(packaged_config("tiny-offline")), packaged_config("tiny-offline")) is None
    full = tmp_path / "full.yaml"
    full.write_text(annotated_yaml(load_config(packaged_config("tiny-srpo")), packaged_config("tiny-srpo")))
    assert set(given_keys(full)) >= {"train.learning_rate", "srpo.window", "eval.seeds"}
    assert defaults_notice(load_config(full), full) is None
    flux = tmp_path / "flux.yaml"
    flux.write_text("model:\n  path: black-forest-labs/FLUX.1-dev\n", encoding="utf-8")
    assert defaults_notice(load_config(flux), flux) is None


def test_train_help_says_which_defaults_fill_a_partial_yaml(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Keys the file leaves unset take the built-in defaults" in text
    assert "FLUX.1-dev's official sampling, train and method settings, not the tiny job's" in text
    assert "--print-config marks each default" in text


def _using_it() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    return readme[readme.index("## Using it"):readme.index("\n## ", readme.index("## Using it") + 1)]


def test_readme_using_it_covers_the_commands_and_settings_a_user_needs():
    text = _using_it()
    for command in ("directalign sample ", "directalign eval ", "directalign compare ", "directalign report "):
        assert command in text, command
    for key in ("model.device", "cuda:N", "train.seed", "run.tensorboard=true", '".[tensorboard]"', "--print-config"):
        assert key in text, key
    assert "general-train" in text and "https://huggingface.co/xswu/HPSv2" in text
    # tiny-offline: the README's command makes exactly the folder the config reads
    offline = load_config(packaged_config("tiny-offline")).srpo.offline_data
    assert f"python -m directalign.world.export_images --out {offline}" in text


def test_readme_quotes_the_defaults_it_names():
    """The README says which defaults fill a partial YAML; the numbers it quotes are the defaults."""
    text = " ".join(_using_it().split())
    m = re.search(r"SRPO: (\d+) steps, batch (\d+), learning rate ([\d.e-]+), rollout guidance ([\d.]+)", text)
    assert m, "the README no longer quotes SRPO's defaults"
    d = Config("srpo")
    assert (int(m[1]), int(m[2]), float(m[3]), float(m[4])) == (
        d.train.steps, d.train.batch_size, d.train.learning_rate, d.srpo.rollout_guidance)
    tiny = load_config(packaged_config("tiny-srpo"))
    assert (d.train.batch_size, d.train.learning_rate) != (tiny.train.batch_size, tiny.train.learning_rate)
    assert "--print-config > my.yaml" in text

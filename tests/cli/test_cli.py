"""The command line: user errors are one line on stderr with exit status 2; --print-config round-trips and shows
exactly the method's own keys for every shipped config; a section of another method and the renamed srpo.shift are
user errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from helpers import SRC

from directalign.cli import main
from directalign.config import build_config, load_config, packaged_config
from directalign.methods.registry import METHODS, sections

SHIPPED = sorted(p.stem for p in packaged_config("tiny-srpo").parent.glob("*.yaml"))


def _keys_of(method: str) -> list[str]:
    """The top-level keys of a resolved config of ``method``, in order."""
    return ["method", "model", "reward", "sampling", METHODS[method].section, "train", "eval", "run"]


def _assert_user_error(capsys, argv, *needles):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("directalign: error:"), lines[0]
    assert "Traceback" not in err and "Traceback" not in out
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def test_unknown_key_via_set(capsys):
    line = _assert_user_error(capsys, ["train", "--set", "train.stepz=3"], "train.stepz")
    assert "steps" in line  # the allowed keys are listed


def test_bad_value_via_set(capsys):
    _assert_user_error(capsys, ["train", "--set", "srpo.window=[30,10]"], "srpo.window")


def test_missing_config_file(capsys, tmp_path):
    _assert_user_error(capsys, ["train", "--config", str(tmp_path / "nope.yaml")], "nope.yaml")


def test_missing_config_file_without_suffix(capsys, tmp_path):
    _assert_user_error(capsys, ["train", "--config", str(tmp_path / "nope")], "nope")


def test_non_utf8_prompt_file(capsys, tmp_path, random_world):
    f = tmp_path / "prompts.txt"
    f.write_bytes("a caf\xe9 on a table\n".encode("latin-1"))
    _assert_user_error(capsys, ["train", "--set", f"train.prompts={f}", "--set",
                                f"run.output_dir={tmp_path / 'run'}"], "prompts.txt", "UTF-8")
    assert not (tmp_path / "run").exists()


def test_empty_prompt_file(capsys, tmp_path, random_world):
    f = tmp_path / "prompts.txt"
    f.write_text("\n   \n\n", encoding="utf-8")
    _assert_user_error(capsys, ["train", "--set", f"train.prompts={f}", "--set",
                                f"run.output_dir={tmp_path / 'run'}"], "prompts.txt")
    assert not (tmp_path / "run").exists()


def test_missing_prompt_file(capsys, tmp_path):
    _assert_user_error(capsys, ["train", "--set", f"eval.prompts={tmp_path / 'gone.txt'}", "--set",
                                f"run.output_dir={tmp_path / 'run'}"], "gone.txt")


def test_model_path_empty_dir(capsys, tmp_path, random_world):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    _assert_user_error(capsys, ["train", "--set", f"model.path={empty}", "--set",
                                f"run.output_dir={tmp_path / 'run'}"], "model.path", "empty-model")
    assert not (tmp_path / "run").exists()


def test_existing_run_dir_without_resume(capsys, tmp_path, random_world):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    _assert_user_error(capsys, ["train", "--set", f"run.output_dir={run}", "--set", "run.progress=false"],
                       "already exists", "--resume")
    assert (run / "metrics.jsonl").read_text() == "{}\n"


def test_resume_without_run_dir(capsys, tmp_path, random_world):
    _assert_user_error(capsys, ["train", "--resume", "--set", f"run.output_dir={tmp_path / 'none'}"], "--resume")


def test_offline_data_missing_caption(capsys, tmp_path):
    from PIL import Image

    d = tmp_path / "data"
    d.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(d / "red.png")
    _assert_user_error(capsys, ["train", "--set", f"srpo.offline_data={d}", "--set",
                                f"run.output_dir={tmp_path / 'run'}"], "red.png")


def test_print_config_round_trips(capsys):
    argv = ["train", "--set", "train.steps=7", "--set", "srpo.window=[10,25]", "--set", "train.learning_rate=1e-4",
            "--set", "reward.positive_words=[Real, Detail]", "--print-config"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    data = yaml.safe_load(out)
    cfg = build_config(data)
    expected = load_config(packaged_config("tiny-srpo"), ["train.steps=7", "srpo.window=[10,25]",
                                                          "train.learning_rate=1e-4",
                                                          "reward.positive_words=[Real, Detail]"])
    assert cfg == expected
    assert cfg.train.steps == 7 and cfg.srpo.window == [10, 25] and cfg.train.learning_rate == 1e-4
    assert list(data) == ["method", "model", "reward", "sampling", "srpo", "train", "eval", "run"]


@pytest.mark.parametrize("name", SHIPPED)
def test_print_config_of_every_shipped_config(name, capsys):
    """By name: exactly the method's keys (its own section, no other method's), and the printed YAML loads back to
    an equal Config."""
    assert main(["train", "--config", name, "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    data = yaml.safe_load(out)
    method = data["method"]
    assert list(data) == _keys_of(method)
    assert not (set(data) & set(sections())) - {METHODS[method].section}
    expected = load_config(packaged_config(name))
    assert build_config(data) == expected
    assert build_config(yaml.safe_load(expected.to_yaml())) == expected


@pytest.mark.parametrize("method", list(METHODS))
def test_print_config_of_every_method(method, capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(f"method: {method}\n", encoding="utf-8")
    assert main(["train", "--config", str(f), "--set", "sampling.shift=2.0", "--print-config"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert list(data) == _keys_of(method)
    assert data["sampling"] == {"shift": 2.0}
    assert build_config(data) == load_config(f, ["sampling.shift=2.0"])


def test_section_of_another_method_via_set(capsys):
    """The default config is SRPO's: a grpo key is an error naming grpo, and so is switching method while the
    srpo section stays."""
    _assert_user_error(capsys, ["train", "--set", "grpo.sde=flow", "--print-config"],
                       "section 'grpo' belongs to method grpo", "but method is srpo", "set method: grpo")
    _assert_user_error(capsys, ["train", "--config", "tiny-grpo", "--set", "srpo.window=[10,25]", "--print-config"],
                       "section 'srpo' belongs to method srpo / direct-align", "but method is grpo")
    _assert_user_error(capsys, ["train", "--config", "tiny-draft-k", "--set", "alignprop.sampling_steps=3"],
                       "section 'alignprop' belongs to method alignprop", "but method is draft-k")


def test_section_of_another_method_in_a_yaml(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: refl\nrefl:\n  loss: linear\ndraft:\n  k: 2\n", encoding="utf-8")
    _assert_user_error(capsys, ["train", "--config", str(f)],
                       "section 'draft' belongs to method draft-k / draft-lv", "but method is refl",
                       "remove the section or set method: draft-k")


def test_renamed_srpo_shift(capsys, tmp_path):
    needles = ("'srpo.shift' was renamed", "use sampling.shift instead")
    _assert_user_error(capsys, ["train", "--set", "srpo.shift=2"], *needles)
    _assert_user_error(capsys, ["train", "--config", "tiny-grpo", "--set", "srpo.shift=2"], *needles)
    f = tmp_path / "old.yaml"
    f.write_text("method: srpo\nsrpo:\n  shift: 1.0\n  window: [5, 25]\n", encoding="utf-8")
    _assert_user_error(capsys, ["train", "--config", str(f), "--print-config"], *needles)


def test_print_config_of_a_file(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 3\n  learning_rate: 2.0e-4\nsrpo:\n  loss: linear\n")
    assert main(["train", "--config", str(f), "--print-config"]) == 0
    cfg = build_config(yaml.safe_load(capsys.readouterr().out))
    assert cfg == load_config(f)
    assert cfg.srpo.loss == "linear"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "directalign" in capsys.readouterr().out


def test_module_help_exits_zero():
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    for argv in (["--help"], ["train", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "directalign", *argv], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage" in proc.stdout.lower()
        assert "Traceback" not in proc.stderr
    assert "--resume" in proc.stdout and "--set" in proc.stdout


HELP_WITHOUT_TORCH = """
import sys
from directalign.cli import main
for argv in ([], ["--help"], ["train", "--help"], ["world", "--help"], ["plan", "--help"], ["eval", "--help"],
             ["compare", "--help"], ["report", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print("HEAVY", sorted(m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules))
"""


def test_help_does_not_import_torch():
    # help is instant: the reward kinds and GPU names come from registries that load torch only when used
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "HEAVY []"
    assert "hpsv2:PATH" in proc.stdout and "--gpu" in proc.stdout  # the registries' help made it into the text
    # sample's help carries the steering flags, built from the steerers' options (torch loads there)
    main_help = subprocess.run([sys.executable, "-m", "directalign", "sample", "--help"], capture_output=True,
                               text=True, env=env, timeout=120)
    assert main_help.returncode == 0 and "--steer-lambda" in main_help.stdout and "best-of-n" in main_help.stdout

def test_module_user_error_exit_status():
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "directalign", "train", "--set", "nope=1"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("directalign: error:") and "nope" in proc.stderr


@pytest.mark.parametrize("argv", [["train", "--bogus-flag"], ["world", "nothing"]])
def test_argparse_errors_exit_two(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2

"""The settings config of the evaluation commands (directalign.eval.settings) and the reward kinds they document."""

import argparse

import pytest

from directalign.cli import main
from directalign.eval.models import resolve_model
from directalign.eval.settings import FLAG_KEYS, flag_overrides, settings_config
from directalign.rewards.registry import LOADERS


def test_shift_flag_sets_the_shared_sampling_shift():
    assert FLAG_KEYS["shift"] == "sampling.shift"
    args = argparse.Namespace(shift=2.5, seeds=[1, 2], steps=None)
    cfg, trained = settings_config(None, [resolve_model("tiny-world")], flag_overrides(args))
    assert cfg.sampling.shift == 2.5 and cfg.eval.seeds == [1, 2] and trained
    assert cfg.eval.steps == settings_config(None, [resolve_model("tiny-world")], {})[0].eval.steps


def test_every_registered_reward_kind_is_documented(monkeypatch, capsys):
    from directalign.cli import eval as eval_commands

    path_kinds = [k for k in LOADERS if k != "tiny-world"]
    for kind in path_kinds:
        assert f"{kind}:PATH" in eval_commands.__doc__
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    for command in ("eval", "compare"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if "comma-separated rewards:" in x)
        assert "train" in line and "tiny-world" in line
        for kind in path_kinds:
            assert f"{kind}:PATH" in line

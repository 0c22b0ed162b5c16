"""run_state: what --resume reads from a run directory before any model loads (issue 16 items 4 and 5), on
hand-made run directories (a checkpoint is complete once its state.json exists)."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_config

from directalign import run_state
from directalign.errors import TrainingError

PROMPTS = ["a red circle", "a blue square"]


def _run(tmp_path, step: int, summary: dict | None = None, **state):
    run = tmp_path / "run"
    ck = run / "checkpoints" / f"step-{step:08d}"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"step": step, "config": "abc", **state}))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def _cfg(*extra):
    return tiny_config("srpo", *extra)


def test_resume_point_states(tmp_path):
    run = _run(tmp_path, 4, train_steps=4)
    point = run_state.resume_point(_cfg("train.steps=4"), run, "abc")
    assert (point.step, point.complete) == (4, False)  # no summary.json yet: the final evaluation is still due
    (run / "summary.json").write_text(json.dumps({"step": 4, "reward_after": 0.5}))
    point = run_state.resume_point(_cfg("train.steps=4"), run, "abc")
    assert point.complete and point.summary["reward_after"] == 0.5
    # more steps asked: a complete run is extended (train.steps is free on resume under a constant schedule)
    assert not run_state.resume_point(_cfg("train.steps=6"), run, "abc").complete
    msg = run_state.complete_message(run, point, _cfg("train.steps=4"))
    assert "already complete (all 4 steps trained" in msg and "nothing was done" in msg
    assert f"directalign report {run}" in msg and "--set train.steps=N" in msg
    assert "train.steps=N" not in run_state.complete_message(run, point, _cfg("train.lr_schedule=cosine"))


def test_extended_run_killed_before_its_new_summary_is_not_complete(tmp_path):
    """summary.json of step 4 with the newest checkpoint at 6: the step-6 evaluation has not run yet."""
    run = _run(tmp_path, 6, summary={"step": 4})
    assert not run_state.resume_point(_cfg("train.steps=6"), run, "abc").complete
    # a summary of an earlier version (no step recorded) counts for the checkpoint's step
    (run / "summary.json").write_text(json.dumps({"reward_after": 0.1}))
    assert run_state.resume_point(_cfg("train.steps=6"), run, "abc").complete


def test_resume_point_refusals(tmp_path):
    run = _run(tmp_path, 4, train_steps=4)
    with pytest.raises(TrainingError, match="at step 4, past train.steps=3; set train.steps to 4 or more"):
        run_state.resume_point(_cfg("train.steps=3"), run, "abc")
    with pytest.raises(TrainingError, match="different config"):
        run_state.resume_point(_cfg("train.steps=4"), run, "xyz")
    with pytest.raises(TrainingError, match="linear decays over train.steps.*keep train.steps=4"):
        run_state.resume_point(_cfg("train.steps=8", "train.lr_schedule=linear"), run, "abc")
    assert run_state.resume_point(_cfg("train.steps=4", "train.lr_schedule=linear"), run, "abc").step == 4
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        run_state.resume_point(_cfg(), tmp_path / "empty", "abc")


def test_base_eval_record_must_match_the_current_eval_settings(tmp_path):
    cfg = _cfg("eval.seeds=[0, 1]")
    (tmp_path / "summary_before.json").write_text(json.dumps(
        {"reward_before": 0.2, "eval_before": run_state.base_eval_settings(cfg, PROMPTS)}))
    assert run_state.BaseEval.read(cfg, tmp_path, PROMPTS).matches
    other = run_state.BaseEval.read(_cfg("eval.seeds=[3]", "eval.steps=4"), tmp_path, PROMPTS)
    assert not other.matches
    assert other.change() == "eval.seeds [0, 1] -> [3], eval.steps 2 -> 4"
    assert "eval.seeds [0, 1] -> [3]" in other.not_measured_reason(before_enabled=False)
    edited = run_state.BaseEval.read(cfg, tmp_path, PROMPTS + ["a third prompt"])  # the same file, edited
    assert not edited.matches and edited.change() == "eval.prompts (its contents)"
    (tmp_path / "summary_before.json").write_text(json.dumps({"reward_before": 0.2}))  # an earlier version's record
    legacy = run_state.BaseEval.read(cfg, tmp_path, PROMPTS)
    assert not legacy.matches and "not recorded" in legacy.change()
    missing = run_state.BaseEval.read(cfg, tmp_path / "nowhere", PROMPTS)
    assert missing.not_measured_reason(before_enabled=False) == "eval.before=false"

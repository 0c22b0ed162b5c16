"""The Python API: ``load_run(dir)`` reopens a run (config, summary, metrics, held-out records, the fine-tuned
pipeline), and resuming a run from its directory (``train --resume RUN_DIR`` / ``train(resume=RUN_DIR)``) takes
the run's own config and refuses overrides that change the trajectory."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CHEAP, COMMON, quiet, tiny_config

import directalign
from directalign.api import RunError, load_run, resume_config
from directalign.errors import UserError
from directalign.logging_utils import read_metrics


def _pipe_images(pipe):
    # latents: the random-weight world of the fixture has no VAE shift_factor, which the pipeline's decode needs
    out = pipe(["a red circle on a blue background", "a green square on a yellow background"], height=32, width=32,
               num_inference_steps=3, guidance_scale=3.5, generator=torch.Generator().manual_seed(0),
               output_type="latent")
    return out.images.float()


def test_load_run_pipeline_is_the_trained_model(random_world, tmp_path):
    from directalign.adapters.loading import load_adapter
    from directalign.engine.finetune import DTYPES

    cfg = tiny_config("srpo", "train.steps=2", "train.learning_rate=2e-2", run_dir=tmp_path / "run")
    result = directalign.train(cfg, log=quiet)

    run = directalign.load_run(tmp_path / "run")
    assert run.run_dir == tmp_path / "run" and run.finished
    assert run.config == cfg
    assert run.summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert run.summary["reward_after"] == result.summary["reward_after"]
    assert [r["step"] for r in run.metrics] == [1, 2] and run.metrics == read_metrics(tmp_path / "run")
    assert run.heldout == []

    reopened = _pipe_images(run.pipeline(device="cpu"))
    trained = _pipe_images(result.pipeline())
    base = _pipe_images(load_adapter(cfg.model, torch.device("cpu"), DTYPES[cfg.model.dtype]).pipe)
    assert torch.allclose(reopened, trained, atol=1e-5), (reopened - trained).abs().max()
    assert (reopened - base).abs().max() > 1e-3  # the run's LoRA is applied, not just the base model


def test_load_run_errors_are_one_line(tmp_path):
    from directalign.eval import EvalError

    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunError, match="is a file"):
        load_run(tmp_path / "afile")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"not a run directory \(no config.yaml\)"):
        load_run(tmp_path / "empty")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(tiny_config("srpo").to_yaml())
    run = load_run(unfinished)
    assert run.summary == {} and run.metrics == [] and not run.finished
    with pytest.raises(EvalError, match="has not finished training"):
        run.pipeline()
    (unfinished / "summary.json").write_text("{oops")
    with pytest.raises(RunError, match="summary.json' is not valid JSON"):
        load_run(unfinished)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.yaml").write_text(tiny_config("srpo", "train.steps=3", run_dir="somewhere/else").to_yaml())
    return d


def test_resume_config_takes_the_runs_own_config(run_dir, monkeypatch):
    cfg = resume_config(run_dir)
    assert cfg.run.output_dir == str(run_dir)  # where the run is now, not where it was started
    assert cfg.train.lora_rank == 4 and cfg.srpo.rollout_steps == 2  # the run's settings, not the defaults
    ok = resume_config(run_dir, ["train.steps=10", "eval.steps=3", "run.sample_every=2", "model.device=cpu",
                                 "train.learning_rate=1e-3", f"run.output_dir={run_dir}"])  # the last two: no-ops
    assert (ok.train.steps, ok.eval.steps, ok.run.sample_every, ok.model.device) == (10, 3, 2, "cpu")
    monkeypatch.chdir(run_dir.parent)
    assert resume_config("run", ["run.output_dir=./run"]).run.output_dir == "run"


@pytest.mark.parametrize("overrides, needles", [
    (["train.learning_rate=0.5"], ["--set train.learning_rate=0.5 changes the run's trajectory (it was 0.001)",
                                   "start a new run"]),
    (["srpo.window=[5,20]"], ["--set srpo.window=[5, 20]", "only train.steps"]),
    (["train.batch_size=1"], ["train.batch_size"]),
    (["run.output_dir=/tmp/other-run"], ["run.output_dir=/tmp/other-run names another directory", "drop that --set"]),
])
def test_resume_config_refuses_trajectory_changes(run_dir, overrides, needles):
    with pytest.raises(RunError) as e:
        resume_config(run_dir, overrides)
    for needle in needles:
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_resume_config_errors_are_user_errors(tmp_path, run_dir):
    with pytest.raises(RunError, match="does not exist"):
        resume_config(tmp_path / "nope")
    with pytest.raises(UserError, match="section 'srpo' belongs to method"):
        resume_config(run_dir, ["method=grpo"])
    with pytest.raises(RunError, match="drop the config argument"):
        directalign.train(tiny_config("srpo"), resume=run_dir)


def test_resume_run_dir_needs_no_overrides_and_extends(random_world, tmp_path, capsys):
    from directalign.cli import main

    run = tmp_path / "run"
    sets = [a for s in COMMON + CHEAP["srpo"] + ["train.steps=2", f"run.output_dir={run}"] for a in ("--set", s)]
    assert main(["train", *sets, "--max-steps-this-session", "1"]) == 0
    assert f"continue with: directalign train --resume {run}" in capsys.readouterr().out
    assert main(["train", "--resume", str(run)]) == 0  # no --config, no --set: the run's own config
    assert [r["step"] for r in read_metrics(run)] == [1, 2] and (run / "summary.json").is_file()
    assert "train.steps" not in capsys.readouterr().err
    result = directalign.train(resume=run, overrides=["train.steps=3"], log=quiet)  # extend a finished run
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3] and "reward_after" in result.summary
    assert load_run(run).config.train.steps == 3

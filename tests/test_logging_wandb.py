"""Weights & Biases logging (``run.wandb``) through a fake ``wandb`` module (no network, wandb need not be
installed), and the held-out records of ``heldout.jsonl`` in :class:`directalign.logging_utils.MetricsLogger`."""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import types

import pytest
from helpers import quiet, tiny_config

from directalign.config import build_config
from directalign.engine.config import ConfigError
from directalign.logging_utils import HELDOUT_FILE, WANDB_ID_FILE, LoggingError, MetricsLogger, read_heldout


class FakeRun:
    def __init__(self, module):
        self.module = module

    def log(self, data, step=None):
        self.module.logs.append((step, dict(data)))

    def finish(self):
        self.module.finished += 1


class FakeImage:
    def __init__(self, path, caption=None):
        self.path, self.caption = path, caption


def fake_wandb(fail: Exception | None = None, logged_in: bool = True) -> types.ModuleType:
    m = types.ModuleType("wandb")
    m.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # diffusers probes find_spec("wandb")
    m.inits, m.logs, m.finished, m.logins = [], [], 0, []
    m.Image = FakeImage

    def login(prompt=True, verify=False):
        m.logins.append({"prompt": prompt, "verify": verify})
        return logged_in

    m.login = login

    def init(**kwargs):
        m.inits.append(kwargs)
        if fail is not None:
            raise fail
        return FakeRun(m)

    m.init = init
    return m


@pytest.fixture
def wandb_module(monkeypatch):
    import diffusers  # noqa: F401  (imported before the fake, as in a real session)

    m = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", m)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return m


def test_wandb_logs_steps_heldout_points_and_resumes_the_same_run(random_world, tmp_path, wandb_module):
    from directalign.training import train

    run = tmp_path / "run"
    cfg = tiny_config("srpo", "train.steps=2", "run.wandb=true", "run.wandb_project=my-project",
                      "run.sample_every=1", run_dir=run)
    train(cfg, max_steps_this_session=1, log=quiet)
    (first,) = wandb_module.inits
    assert first["project"] == "my-project" and first["name"] == "run" and first["dir"] == str(run)
    assert first["config"] == cfg.to_dict() and first["resume"] == "allow"
    assert "mode" not in first  # WANDB_MODE (offline here) decides, as wandb.init reads it itself
    assert (run / WANDB_ID_FILE).read_text().strip() == first["id"]
    assert wandb_module.finished == 1
    steps = [(step, sorted(k for k in data if k in ("loss", "reward", "heldout/reward"))) for step, data in
             wandb_module.logs]
    assert steps == [(0, ["heldout/reward"]), (1, ["loss", "reward"]), (1, ["heldout/reward"])]
    image = wandb_module.logs[0][1]["heldout/samples"]
    assert isinstance(image, FakeImage) and image.path == str(run / "samples" / "step-0.png")
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for _, d in wandb_module.logs[1:2]
               for v in d.values())

    train(cfg, resume=True, log=quiet)  # the second session continues the same W&B run
    assert len(wandb_module.inits) == 2 and wandb_module.inits[1]["id"] == first["id"]
    assert [s for s, _ in wandb_module.logs[3:]] == [2, 2] and wandb_module.finished == 2
    assert [r["step"] for r in read_heldout(run)] == [0, 1, 2]


def test_wandb_missing_is_one_line_before_the_model_loads(random_world, tmp_path, monkeypatch, capsys):
    import directalign.training as training
    from directalign.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as when it is not installed

    def no_load(*_a, **_k):
        raise AssertionError("the model loaded before the missing wandb was reported")

    monkeypatch.setattr(training, "load_adapter", no_load)
    cfg = tiny_config("srpo", "run.wandb=true", run_dir=tmp_path / "run")
    with pytest.raises(LoggingError, match=r"run.wandb=true needs the wandb package: pip install wandb"):
        training.train(cfg, log=quiet)
    assert not (tmp_path / "run").exists()
    code = main(["train", "--set", "run.wandb=true", "--set", f"run.output_dir={tmp_path / 'cli-run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install wandb" in err[0]
    assert not (tmp_path / "cli-run").exists()


def test_wandb_without_a_key_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """Online W&B with no API key: one line before anything loads; offline modes and a wandb too old for
    ``login(prompt=)`` are not asked."""
    import directalign.training as training
    from directalign.cli import main
    from directalign.logging_utils import check_wandb_login

    wandb = fake_wandb(logged_in=False)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)

    def no_load(*_a, **_k):
        raise AssertionError("the model loaded before the missing W&B key was reported")

    monkeypatch.setattr(training, "load_adapter", no_load)
    code = main(["train", "--set", "run.wandb=true", "--set", f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no W&B API key" in err[0] and "wandb login" in err[0], err
    assert wandb.logins == [{"prompt": False, "verify": False}] and wandb.inits == []
    assert not (tmp_path / "run").exists()
    for mode in ("offline", "disabled", " Dryrun "):
        monkeypatch.setenv("WANDB_MODE", mode)
        check_wandb_login(wandb)
    assert len(wandb.logins) == 1
    monkeypatch.setenv("WANDB_MODE", "online")
    check_wandb_login(fake_wandb(logged_in=True))

    old = fake_wandb()
    old_calls = []

    def old_login(key=None, relogin=None, host=None, force=None, timeout=None, verify=False):
        old_calls.append({"key": key, "relogin": relogin, "host": host, "force": force, "verify": verify})
        return True  # a call without prompt= would reach here (and, in a real old wandb, could prompt)

    old.login = old_login
    check_wandb_login(old)  # no prompt= (older wandb): no call that could prompt, wandb.init reports instead
    assert old_calls == []

    def broken(prompt=True, verify=False):
        raise RuntimeError("invalid host https://nowhere\nmore")

    bad = fake_wandb()
    bad.login = broken
    with pytest.raises(LoggingError, match=r"^run.wandb=true: wandb.login failed \(invalid host https://nowhere\);"):
        check_wandb_login(bad)


def test_wandb_init_failure_is_one_line_and_leaves_the_logs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(RuntimeError("api_key not configured (no-tty).\nmore")))
    metrics = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in (1, 2, 3))
    metrics.write_text(text)
    with pytest.raises(LoggingError) as e:
        MetricsLogger(tmp_path, append=True, resume_step=1, wandb_project="p")
    msg = str(e.value)
    assert "\n" not in msg and "api_key not configured" in msg and "wandb login" in msg and "WANDB_MODE=offline" in msg
    assert metrics.read_text() == text and not (tmp_path / WANDB_ID_FILE).exists()


def test_heldout_records_are_json_trimmed_on_resume_and_reset_on_a_new_run(tmp_path, monkeypatch):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    log = MetricsLogger(tmp_path, wandb_project="p")
    for step in range(4):
        log.write_heldout({"step": step, "reward": float("nan") if step == 2 else 0.1 * step})
    log.close()
    lines = (tmp_path / HELDOUT_FILE).read_text().splitlines()
    assert [json.loads(line)["reward"] for line in lines] == [0.0, 0.1, None, pytest.approx(0.3)]  # strict JSON
    assert [d for _, d in wandb.logs][2] == {}  # a non-finite point is not sent
    # a run resumed from the checkpoint of step 1 replays steps 2 and 3: their old records go
    log = MetricsLogger(tmp_path, append=True, resume_step=1)
    log.close()
    assert [r["step"] for r in read_heldout(tmp_path)] == [0, 1]
    log = MetricsLogger(tmp_path)  # a new run in the same directory (--overwrite) starts with no records
    log.close()
    assert read_heldout(tmp_path) == []


@pytest.mark.parametrize("overrides, needle", [
    (["run.sample_every=-1"], "run.sample_every: must be >= 0"),
    (["run.wandb=true", "run.wandb_project= "], "run.wandb_project: empty"),
])
def test_run_section_validates_the_new_fields(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config({}, overrides)
    cfg = build_config({}, [])
    assert (cfg.run.wandb, cfg.run.sample_every) == (False, 0)  # both off by default

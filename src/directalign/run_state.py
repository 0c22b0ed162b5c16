"""What a run directory says about the run ``--resume`` continues, read before any model loads.

* How far it got: the newest complete checkpoint's step. ``train.steps`` below it is refused (exporting the longer run
  under a ``config.yaml`` that says the shorter one would mislabel it), and so is a new ``train.steps`` under a
  decaying learning-rate schedule (the schedule spans ``train.steps``: the steps already taken used the old span).
* Whether it is complete: ``summary.json`` written for the final step. Resuming a complete run does nothing; its
  results stay as they are (``directalign eval`` / ``directalign report`` redo the evaluation or the page).
* Which settings its base-model evaluation used: ``summary_before.json`` records ``eval_before`` (prompts, seeds,
  sampling steps, guidance, best-of-n). A resumed run whose ``eval.*`` differ evaluates the base model again on the
  new settings, or, with ``eval.before=false``, reports the base model as not measured, so that ``reward_before``
  and ``reward_after`` always come from the same prompts and seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .engine import checkpoint as ckpt
from .errors import TrainingError

SUMMARY = "summary.json"
SUMMARY_BEFORE = "summary_before.json"
DECAYING_SCHEDULES = ("cosine", "linear")  # their multiplier depends on train.steps (engine.finetune.lr_lambda)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------------------------- base eval
def base_eval_settings(cfg, eval_prompts: list[str]) -> dict:
    """The settings a held-out number depends on beyond the run's identity (model, reward, sampling.shift and
    resolution are part of the checkpoint's config fingerprint, so a resume cannot change them)."""
    e = cfg.eval
    return {"prompts": e.prompts, "prompt_count": len(eval_prompts), "prompts_digest": ckpt.fingerprint(
        {"prompts": list(eval_prompts)}), "seeds": list(e.seeds), "steps": e.steps, "guidance": e.guidance,
        "best_of": e.best_of}


def settings_change(old: dict | None, new: dict) -> str:
    """'eval.seeds [0, 1] -> [3], eval.steps 16 -> 8' (what differs between two :func:`base_eval_settings`)."""
    if not old:
        return "its eval settings were not recorded (a run from an earlier version)"
    parts = []
    for key, value in new.items():
        if old.get(key) == value:
            continue
        if key in ("prompt_count", "prompts_digest"):
            if old.get("prompts") == new["prompts"] and "eval.prompts (its contents)" not in parts:
                parts.append("eval.prompts (its contents)")
            continue
        parts.append(f"eval.{key} {old.get(key)} -> {value}")
    return ", ".join(parts)


@dataclass
class BaseEval:
    """The run's recorded base evaluation and whether it fits the current eval settings."""

    record: dict | None  # summary_before.json
    settings: dict  # the current base_eval_settings

    @classmethod
    def read(cls, cfg, run_dir: Path, eval_prompts: list[str]) -> BaseEval:
        return cls(read_json(Path(run_dir) / SUMMARY_BEFORE), base_eval_settings(cfg, eval_prompts))

    @property
    def matches(self) -> bool:
        return self.record is not None and self.record.get("eval_before") == self.settings

    def change(self) -> str:
        return settings_change(self.record.get("eval_before") if self.record else None, self.settings)

    def not_measured_reason(self, before_enabled: bool) -> str:
        """Why the summary has no base-model numbers (only meaningful when :attr:`matches` is False)."""
        if self.record is None:
            return "eval.before=false" if not before_enabled else "no base evaluation was recorded"
        return f"the recorded base evaluation used other eval settings ({self.change()}) and eval.before=false"


# ---------------------------------------------------------------------------------------------------- resume
@dataclass
class ResumePoint:
    step: int  # the newest complete checkpoint's step
    checkpoint: Path
    complete: bool  # summary.json was written for this step: nothing is left to do
    summary: dict | None


def _steps_trained(summary: dict | None, step: int) -> int:
    value = (summary or {}).get("step")
    return value if isinstance(value, int) else step  # summaries of earlier versions: the checkpoint's step


def resume_point(cfg, run_dir: Path, config_fingerprint: str) -> ResumePoint:
    """Where ``--resume`` continues ``run_dir`` from, checked against ``cfg`` without loading any weights: a one-line
    :class:`TrainingError` when it cannot continue under this config."""
    root = Path(run_dir) / "checkpoints"
    latest = ckpt.latest_checkpoint(root)
    if latest is None:
        raise TrainingError(f"--resume: no complete checkpoint under {root}; start without --resume "
                            "(with --overwrite)")
    state = read_json(latest / ckpt.STATE_FILE) or {}
    step = state.get("step")
    if not isinstance(step, int):  # an unreadable state.json: loading the checkpoint reports it
        return ResumePoint(-1, latest, False, None)
    if state.get("config") not in (None, config_fingerprint):
        raise TrainingError(f"--resume: checkpoint {latest.name} was written with a different config; resume "
                            f"with the run's own config ({Path(run_dir) / 'config.yaml'}) or start a new run")
    t = cfg.train
    if step > t.steps:
        raise TrainingError(f"--resume: the run's newest checkpoint is at step {step}, past train.steps={t.steps}; "
                            f"set train.steps to {step} or more (or start a new run for {t.steps} steps)")
    old_steps = state.get("train_steps")
    if t.lr_schedule in DECAYING_SCHEDULES and isinstance(old_steps, int) and old_steps != t.steps:
        raise TrainingError(f"--resume: train.lr_schedule={t.lr_schedule} decays over train.steps, and the run's "
                            f"first {step} steps followed a {old_steps}-step schedule; keep train.steps={old_steps} "
                            "or start a new run")
    summary = read_json(Path(run_dir) / SUMMARY)
    complete = summary is not None and step == t.steps and _steps_trained(summary, step) == step
    return ResumePoint(step, latest, complete, summary)


def complete_message(run_dir: Path, point: ResumePoint, cfg) -> str:
    report = Path(run_dir) / "report.html"
    further = "" if cfg.train.lr_schedule in DECAYING_SCHEDULES else ", or train further with --set train.steps=N"
    return (f"run {run_dir} is already complete (all {point.step} steps trained, {SUMMARY} written); nothing was "
            f"done. Evaluate it again with `directalign eval --model {run_dir}`"
            + (f", see {report}" if report.is_file() else f", write its report with `directalign report {run_dir}`")
            + further)

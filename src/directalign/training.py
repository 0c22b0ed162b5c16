"""``train``: wires a model adapter, a reward, a method, the engine, evaluation, export and the report into a run.

Order matters for users: everything a user can get wrong (flags against the run directory, prompts, the model, the
reward, the method's own inputs such as offline images) is checked before the run directory is touched; the base
model is evaluated before any adapter is attached; the trajectory depends only on (config, model, seed), so a run
resumed at step k replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, preflight, run_state, source_images
from .adapters.loading import load_adapter
from .config import Config, diff_from_defaults
from .engine import checkpoint as ckpt
from .engine import distributed as dist_utils
from .engine.context import PromptSampler
from .engine.finetune import DTYPES, FineTuning, resolve_device
from .engine.loop import StepLoop
from .engine.rundir import RunDirLock, prepare_run_dir
from .errors import TrainingError
from .eval.heldout import best_of_n, evaluate
from .export import export_weights
from .logging_utils import MetricsLogger, check_loggers
from .methods.registry import METHODS
from .periodic_samples import HeldoutSamples
from .prompts import load_prompts
from .report import write_report
from .report_images import save_grid
from .rewards.registry import load_reward


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    adapter: object = None
    metrics: list[dict] = field(default_factory=list)
    already_complete: bool = False  # --resume of a finished run: nothing was loaded or done

    def pipeline(self):
        """The fine-tuned diffusers pipeline (LoRA active or full weights), ready to generate."""
        if self.adapter is None:
            raise TrainingError(f"run {self.run_dir} was already complete, so nothing was loaded; open it with "
                                f"directalign.load_run({str(self.run_dir)!r}).pipeline()")
        return self.adapter.pipe


def identity(cfg: Config, adapter, world_size: int = 1) -> dict:
    """What a checkpoint must match to be resumed: the model and every setting that changes the trajectory."""
    return {"model": ckpt.fingerprint(adapter.identity()), "config": config_fingerprint(cfg, world_size)}


def config_fingerprint(cfg: Config, world_size: int = 1) -> str:
    """The config half of :func:`identity` (needs no model, so a resume can be checked before anything loads)."""
    # Only settings that differ from the defaults count, so a new config field (with a default that keeps the old
    # behaviour) does not orphan older runs. Logging, checkpoint cadence, output paths, evaluation, the step budget,
    # where the model lives and which device runs it do not change the trajectory; the model digest covers weights.
    ignored = ("run.", "eval.")
    # How the work is split across ranks does not either: the batch counts globally, so a run can resume on another
    # number of processes with the same global batch (per-rank noise keeps the trajectory; shared noise changes it).
    ignored_keys = {"train.steps", "model.path", "model.device", "train.distributed", "train.batch_size"}
    d = {k: v for k, v in diff_from_defaults(cfg).items() if not k.startswith(ignored) and k not in ignored_keys}
    d["global_batch"] = cfg.train.batch_size * world_size
    return ckpt.fingerprint(d)


def _check_resolution(cfg: Config, adapter) -> None:
    for side in ("height", "width"):
        value, multiple = getattr(cfg.model, side), adapter.resolution_multiple
        if value % multiple:
            raise TrainingError(f"model.{side}={value} is not a multiple of {multiple} (VAE factor x 2x2 "
                                f"packing); use {max(1, value // multiple) * multiple}")


def _evaluate_base(cfg: Config, adapter, reward, eval_prompts, run_dir: Path, log) -> None:
    """Held-out reward (and best-of-n) of the base model, written to ``summary_before.json``."""
    t0 = time.time()
    is_world = cfg.model.path == "tiny-world"
    before = evaluate(adapter, reward, cfg, eval_prompts, is_world, desc="base model: held-out eval")
    bo = best_of_n(adapter, reward, cfg, eval_prompts, cfg.eval.best_of) if cfg.eval.best_of > 1 else None
    save_grid(before.images, run_dir / "samples" / "before.png", ncol=len(cfg.eval.seeds) * 4)
    (run_dir / run_state.SUMMARY_BEFORE).write_text(json.dumps(
        {"reward_before": before.reward, f"reward_best_of_{cfg.eval.best_of}": bo, "judge_before": before.judge,
         "eval_seconds": time.time() - t0, "eval_before": run_state.base_eval_settings(cfg, eval_prompts)}, indent=1))
    log(f"base model: held-out reward {before.reward:.4f}"
        + (f", best-of-{cfg.eval.best_of} {bo:.4f}" if bo is not None else ""))


def _resume_from(cfg: Config, run_dir: Path, ids: dict, ft: FineTuning, log, method=None) -> int:
    ckpt_root = run_dir / "checkpoints"
    latest = ckpt.latest_checkpoint(ckpt_root)
    if latest is None:
        raise TrainingError(f"--resume: no complete checkpoint under {ckpt_root}; start without --resume "
                            "(with --overwrite)")
    loaded = ckpt.load_checkpoint(latest)
    st = loaded["state"]
    if st.get("model") != ids["model"]:
        raise TrainingError(f"--resume: checkpoint {latest.name} was trained from a different model; use the "
                            "model it was trained from or start a new run")
    if st.get("config") != ids["config"]:
        raise TrainingError(f"--resume: checkpoint {latest.name} was written with a different config; resume "
                            f"with the run's own config ({run_dir / 'config.yaml'}) or start a new run")
    ft.restore(loaded)  # checkpoints hold whole tensors whatever wrote them: any strategy and world size reads them
    if loaded.get("method") is not None and hasattr(method, "load_state_dict"):  # a method's own cross-step state
        method.load_state_dict(loaded["method"])
    if ft.info.is_main:
        log(f"resumed from {latest} at step {st['step']}")
    return st["step"]


def train(cfg: Config, resume: bool = False, overwrite: bool = False, max_steps_this_session: int | None = None,
          log=print) -> RunResult:
    """Run (or resume) a training job described by ``cfg``; returns the run directory and the summary."""
    preflight.check(cfg, resume, overwrite)  # run directory, paths, device, resolution: before anything loads
    check_loggers(cfg.run)  # e.g. run.wandb=true without wandb: one line before any model loads
    train_prompts = load_prompts(cfg.train.prompts)
    eval_prompts = load_prompts(cfg.eval.prompts)
    sources = source_images.for_config(cfg, training=True)  # an edit family: each prompt's image, checked
    info = dist_utils.init_from_env(cfg.model.device)
    device = dist_utils.device_for(info, cfg.model.device) if info.enabled else resolve_device(cfg.model.device)
    if cfg.model.dtype == "float16" and device.type == "cpu" and info.is_main:
        # It trains (float32 master weights keep AdamW finite), but CPUs have no fast float16 arithmetic
        log("note: model.dtype=float16 on the CPU computes 3-10x slower than float32 (measured on the tiny world) "
            "and saves no time; model.dtype=float32 is faster there")
    if resume:  # before any model loads: a finished run, a too-small train.steps, a changed config
        point = run_state.resume_point(cfg, Path(cfg.run.output_dir), config_fingerprint(cfg, info.world_size))
        if point.complete:
            if info.is_main:
                log(run_state.complete_message(Path(cfg.run.output_dir), point, cfg))
            return RunResult(Path(cfg.run.output_dir), point.summary, already_complete=True)
    torch.manual_seed(cfg.train.seed)
    adapter = load_adapter(cfg.model, device, DTYPES[cfg.model.dtype])
    source_images.attach(adapter, sources)
    _check_resolution(cfg, adapter)
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, device, spec.held_out_form(cfg)[0])
    method = spec.build(cfg, adapter, reward)  # before fine-tuning: a method may copy the base weights

    run_dir = Path(cfg.run.output_dir)
    lock = RunDirLock(run_dir) if info.is_main else None
    try:
        if info.is_main:
            prepare_run_dir(run_dir, resume, overwrite, lock=lock)
            if reward.describe():  # e.g. a weighted sum states its normalisation once, in the log
                log(reward.describe())
        dist_utils.barrier(info)
        return _run(cfg, resume, max_steps_this_session, log, info, device, adapter, reward, method, run_dir,
                    train_prompts, eval_prompts)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg, resume, max_steps_this_session, log, info, device, adapter, reward, method, run_dir,
         train_prompts, eval_prompts) -> RunResult:
    # Evaluate the base model before any adapter is attached (the adapter's cache serves both). A resumed run keeps
    # its recorded base evaluation only when it used the current eval settings (run_state.BaseEval).
    base = run_state.BaseEval.read(cfg, run_dir, eval_prompts) if resume else None
    if info.is_main and base is not None and base.record is not None and not base.matches:
        log(f"the recorded base-model evaluation does not fit this session's eval settings ({base.change()}): "
            + ("evaluating the base model again on the current ones" if cfg.eval.before else
               "with eval.before=false the summary reports the base model as not measured"))
    if cfg.eval.before and info.is_main and not (base is not None and base.matches):
        _evaluate_base(cfg, adapter, reward, eval_prompts, run_dir, log)
    dist_utils.barrier(info)

    ids = identity(cfg, adapter, info.world_size)  # before sharding: the digest reads whole base weights
    ft = FineTuning.setup(cfg.train, adapter, info)
    start_step = _resume_from(cfg, run_dir, ids, ft, log, method) if resume else 0
    if info.is_main:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    t = cfg.train
    sampler = PromptSampler(train_prompts, t.batch_size, t.seed, t.shuffle_prompts, info.rank, info.world_size)
    world = info.world_size

    def checkpoint_state(step_done: int) -> dict:
        return dict(ids, data_position=list(sampler.position(step_done, 0)), version=__version__, world_size=world,
                    distributed="fsdp" if ft.fsdp else "replicate" if info.enabled else "none", train_steps=t.steps)

    end = t.steps if max_steps_this_session is None else min(t.steps, start_step + max_steps_this_session)
    metrics = MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard, append=resume, resume_step=start_step,
                            wandb_project=cfg.run.wandb_project if cfg.run.wandb else None,
                            wandb_config=cfg.to_dict()) if info.is_main else None
    samples = HeldoutSamples(cfg, adapter, reward, eval_prompts, run_dir, metrics, info.is_main)
    loop = StepLoop(train_cfg=t, run_cfg=cfg.run, method=method, ft=ft, sampler=sampler, device=device,
                    run_dir=run_dir, checkpoint_state=checkpoint_state, extra_metrics=reward.step_metrics, log=log,
                    desc=cfg.method, after_step=samples, precompute_prompts=t.precompute_prompts)
    try:
        if start_step == 0:
            samples(0)  # the base model's point (run.sample_every > 0 only)
        done = loop.run(start_step, end, resume, metrics)
    finally:
        if metrics is not None:
            metrics.close()

    if done.step < t.steps:  # a partial session: no final evaluation
        dist_utils.barrier(info)
        return RunResult(run_dir, {"step": done.step}, adapter)
    ft.finalize()
    if not info.is_main:
        dist_utils.barrier(info)
        return RunResult(run_dir, {"step": done.step}, adapter)
    summary = finish(cfg, run_dir, adapter, reward, eval_prompts, done.skipped)
    dist_utils.barrier(info)
    return RunResult(run_dir, summary, adapter)


def finish(cfg: Config, run_dir: Path, adapter, reward, eval_prompts, skipped: int) -> dict:
    """Evaluate after training, write sample grids, export weights, write summary.json (and the report)."""
    after = evaluate(adapter, reward, cfg, eval_prompts, cfg.model.path == "tiny-world",
                     desc="tuned model: held-out eval")
    save_grid(after.images, run_dir / "samples" / "after.png", ncol=len(cfg.eval.seeds) * 4)
    export_weights(cfg, adapter, run_dir / "export")
    base = run_state.BaseEval.read(cfg, run_dir, eval_prompts)  # base numbers only from the same prompts, seeds
    summary = dict(base.record) if base.matches else {"before_not_measured": base.not_measured_reason(cfg.eval.before)}
    summary.update({
        "step": cfg.train.steps,
        "reward_after": after.reward,
        "judge_after": after.judge,
        "skipped_steps": skipped,
        "eval_prompts": len(eval_prompts),
        "eval_seeds": cfg.eval.seeds,
        "reward_definition": "training reward on held-out prompts (see directalign.eval.heldout)",
    })
    (run_dir / run_state.SUMMARY).write_text(json.dumps(summary, indent=1))
    if cfg.run.report:
        summary["report"] = str(write_report(run_dir))
    return summary

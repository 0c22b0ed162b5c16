"""The Python API for notebooks and scripts.

    import directalign as da
    cfg = da.load_config("tiny-srpo", overrides=["train.steps=50"])   # a shipped name or a YAML path
    run = da.train(cfg)                       # RunResult: run_dir, summary
    pipe = run.pipeline()                     # the fine-tuned diffusers FluxPipeline
    images = pipe(["a red circle on a blue background"], height=32, width=32, output_type="pt").images

    run = da.load_run("runs/srpo-tiny")       # a finished run, later: .config, .summary, .metrics, .heldout
    pipe = run.pipeline()                     # its base model with the run's export (LoRA or transformer) applied
    da.train(resume="runs/srpo-tiny", overrides=["train.steps=100"])  # continue (or extend) it

``directalign train --resume RUN_DIR`` uses :func:`resume_config` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

# What may change when a run is resumed (everything else changes the trajectory the checkpoint belongs to):
# the step budget (to extend a run), where the model lives and which device runs it, evaluation and run settings.
RESUME_FREE_KEYS = ("train.steps", "model.device", "model.path", "train.distributed")
RESUME_FREE_SECTIONS = ("eval.", "run.")


class RunError(UserError, ValueError):
    """A run directory cannot be opened or resumed as asked; the message says why and what to do."""


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None):
    """A validated :class:`directalign.config.Config` from a shipped config name, a YAML path or a dict."""
    from .config import build_config, resolve_config_path
    from .engine.config import load_yaml

    if isinstance(source, dict):
        return build_config(source, overrides)
    return build_config(load_yaml(resolve_config_path(None if source is None else str(source))), overrides)


def _run_config_file(run_dir, what: str) -> Path:
    path = Path(run_dir).expanduser()
    if not path.exists():
        raise RunError(f"{what} {str(run_dir)!r}: the directory does not exist; give the run.output_dir of a "
                       "training run")
    if not path.is_dir():
        raise RunError(f"{what} {str(run_dir)!r} is a file, not a run directory; give the run.output_dir of a "
                       "training run")
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise RunError(f"{what} {str(run_dir)!r} is not a run directory (no config.yaml); give the run.output_dir "
                       "of a training run")
    return cfg_file


def _changed_keys(a, b) -> dict:
    """``{"x.y": (value in a, value in b)}`` of every setting where configs ``a`` and ``b`` differ."""
    from .engine.config import flat_diff

    if a.method != b.method:
        return {"method": (a.method, b.method)}
    out = {}
    for name, section in b.section_items():
        before = flat_diff(getattr(a, name), section, name + ".")
        after = flat_diff(section, getattr(a, name), name + ".")
        out.update({k: (before[k], after[k]) for k in after})
    return out


def resume_config(run_dir, overrides: list[str] | None = None):
    """The config to resume the run in ``run_dir`` with: its own ``config.yaml``, ``run.output_dir`` = ``run_dir``,
    plus ``overrides`` that do not change the trajectory (``train.steps``, ``model.device``, ``model.path``,
    ``train.distributed``, ``eval.*``, ``run.*``); any other override is a one-line :class:`RunError`."""
    from .config import load_run_config

    cfg_file = _run_config_file(run_dir, "--resume")
    base = load_run_config(cfg_file)
    cfg = load_run_config(cfg_file, overrides, log=lambda note: None)  # the notes were given once, just above
    changed = _changed_keys(base, cfg)
    for key, (old, new) in changed.items():
        if key not in RESUME_FREE_KEYS and not key.startswith(RESUME_FREE_SECTIONS):
            raise RunError(f"--resume {run_dir!s}: --set {key}={new} changes the run's trajectory (it was {old}); "
                           "only train.steps, model.device, model.path, train.distributed, eval.* and run.* may "
                           f"change when resuming; start a new run to change {key}")
    if "run.output_dir" in changed and Path(cfg.run.output_dir).expanduser().resolve() != \
            Path(run_dir).expanduser().resolve():
        raise RunError(f"--resume {run_dir!s}: --set run.output_dir={cfg.run.output_dir} names another directory; "
                       f"the run continues in {run_dir!s}, so drop that --set")
    cfg.run.output_dir = str(run_dir)
    return cfg


def train(config=None, *, resume: bool | str | Path = False, overwrite: bool = False,
          overrides: list[str] | None = None, log=print):
    """Train from a Config (or anything :func:`load_config` accepts, with ``overrides``); returns a ``RunResult``.

    ``resume=True`` continues the run in the config's ``run.output_dir``; ``resume=RUN_DIR`` continues the run in
    RUN_DIR with its own config (``config`` must then be None; ``overrides`` as :func:`resume_config` allows)."""
    from .config import Config, build_config
    from .training import train as _train

    if not isinstance(resume, bool):
        if config is not None:
            raise RunError("train(resume=RUN_DIR) uses the run's own config.yaml; drop the config argument (use "
                           "overrides=[...] to change train.steps, eval.* or run.*)")
        return _train(resume_config(resume, overrides), resume=True, overwrite=overwrite, log=log)
    if isinstance(config, Config):
        cfg = build_config(config.to_dict(), overrides) if overrides else config
    else:
        cfg = load_config(config, overrides)
    return _train(cfg, resume=resume, overwrite=overwrite, log=log)


@dataclass
class Run:
    """A training run on disk (see :func:`load_run`)."""

    run_dir: Path
    config: object  # directalign.config.Config
    summary: dict = field(default_factory=dict)  # summary.json ({} before the final evaluation)
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl
    heldout: list[dict] = field(default_factory=list)  # heldout.jsonl (run.sample_every)

    @property
    def finished(self) -> bool:
        """True once the final evaluation and the export are written."""
        return "reward_after" in self.summary

    def adapter(self, device: str | None = None):
        """The run's base model with its exported weights applied (``export/lora``, else ``export/transformer``)
        as a directalign model adapter; ``device`` overrides ``model.device`` of the run's config."""
        import copy

        from .eval.models import load_model, resolve_model

        cfg = self.config
        if device is not None:
            cfg = copy.deepcopy(cfg)
            cfg.model.device = device
        return load_model(resolve_model(str(self.run_dir)), cfg)

    def pipeline(self, device: str | None = None):
        """The fine-tuned diffusers pipeline (base model + the run's LoRA or transformer), ready to generate."""
        return self.adapter(device).pipe

    def report(self, out=None) -> Path:
        """Write (or rewrite) the run's ``report.html`` (or ``out``) and return its path."""
        from .report import write_report

        return write_report(self.run_dir, out)


def load_run(run_dir) -> Run:
    """Reopen the run in ``run_dir``: its config, summary, metrics and held-out records; ``.pipeline()`` loads the
    fine-tuned model (after training finished: a run still training has no export yet)."""
    import json

    from .config import load_run_config
    from .logging_utils import read_heldout, read_metrics

    cfg_file = _run_config_file(run_dir, "load_run:")
    path = cfg_file.parent
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        summary = {}
    except ValueError:
        raise RunError(f"load_run: {str(path / 'summary.json')!r} is not valid JSON; rerun the final evaluation "
                       "(directalign eval) or delete the file") from None
    return Run(path, load_run_config(cfg_file), summary, read_metrics(path), read_heldout(path))


def steered_sample(model: str = "tiny-world", prompts: list[str] | None = None, *, method: str = "best-of-n",
          seeds: list[int] | None = None, reward: str | None = None, options: dict | None = None,
          config: str | None = None, base: str | None = None, settings: dict | None = None,
          progress: bool = False):
    """Steered sampling from Python, as ``directalign sample --steer``: one image per (prompt, seed) slot,
    prompt-major, from ``model`` (tiny-world, base, a run directory, a LoRA or merged export, a hub id) steered by
    ``method`` (best-of-n, noise-search, fk, reno, dno) towards ``reward`` (a ``--rewards`` spec; default ``train``,
    the run's held-out reward).

    ``options`` are the method's options by field or flag name (``{"n": 8}``, ``{"lambda": 10, "potential":
    "max"}``); ``settings`` overrides sampling settings by config key (``{"eval.steps": 8}``); ``config`` is the
    settings config (as ``--config``). Returns a :class:`directalign.steer.SteerResult` (images, rewards, chosen
    candidates, NFE with and without gradient, reward calls, seconds); ``extra["prompts"]`` / ``extra["seeds"]``
    hold the slots::

        res = da.steered_sample("tiny-world", ["a red circle"], method="fk", seeds=[0, 1], options={"n": 4},
                       settings={"eval.steps": 8})
    """
    from .eval.heldout import eval_slots
    from .eval.models import load_model, resolve_model
    from .eval.scoring import requested_rewards
    from .eval.settings import settings_config
    from .prompts import load_prompts
    from .steer import SteerSettings
    from .steer.run import build_options, reward_function, steer_with

    opts = build_options(method, options)
    ref = resolve_model(model, None, base)
    cfg, trained = settings_config(config, [ref], {**(settings or {}), "run.progress": progress})
    if config is not None:
        ref = resolve_model(model, cfg, base)
    slot_prompts, slot_seeds = eval_slots(list(prompts) if prompts is not None else load_prompts(cfg.eval.prompts),
                                          list(seeds) if seeds is not None else cfg.eval.seeds)
    spec = requested_rewards([reward] if reward else None, trained)[0].strip()
    adapter = load_model(ref, cfg)
    result = steer_with(method, adapter, reward_function(spec, cfg, trained), spec, slot_prompts, slot_seeds,
                        SteerSettings.from_config(cfg, opts), progress, ref.label)
    result.extra["prompts"], result.extra["seeds"] = slot_prompts, slot_seeds
    return result

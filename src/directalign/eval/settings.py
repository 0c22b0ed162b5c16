"""The one config every model of a ``sample | eval | compare`` command is generated and scored with.

It comes from ``--config``, else from the run's own ``config.yaml`` when a model is a run directory, else from the
shipped ``tiny-srpo`` config (tiny-world models) or plain defaults (other models); flags such as ``--prompts`` or
``--seeds`` override it (:data:`FLAG_KEYS`).
"""

from __future__ import annotations

import copy

from .models import ModelRef

# command-line flag (argparse dest) -> the config key it overrides
FLAG_KEYS = {
    "prompts": "eval.prompts", "seeds": "eval.seeds", "steps": "eval.steps", "guidance": "eval.guidance",
    "batch_size": "eval.batch_size", "shift": "sampling.shift", "height": "model.height", "width": "model.width",
    "device": "model.device",
}


def flag_overrides(args) -> dict:
    """``{config key: value}`` of the settings flags in ``args`` (None where a flag was not given), plus
    ``run.progress``: these commands show progress bars unless ``--no-progress``, whatever the settings config
    (often a run's own config.yaml) says about its training's bars."""
    out = {key: getattr(args, dest, None) for dest, key in FLAG_KEYS.items()}
    out["run.progress"] = not getattr(args, "no_progress", False)
    return out


def settings_config(config: str | None, refs: list[ModelRef], overrides: dict):
    """The Config every model of one command is generated and scored with, plus whether it defines a training
    reward (it does when it comes from a file, a run, or the shipped tiny-srpo config)."""
    from ..config import (
        Config,
        load_config,
        packaged_config,
        resolve_config_path,
        validate,
    )

    if config is not None:
        cfg, trained = load_config(resolve_config_path(config)), True
    else:
        run = next((r for r in refs if r.cfg is not None), None)
        if run is not None:
            cfg, trained = copy.deepcopy(run.cfg), True
        elif all(r.is_world for r in refs):
            cfg, trained = load_config(packaged_config("tiny-srpo")), True
        else:
            cfg, trained = Config(), False
            cfg.eval.prompts, cfg.eval.seeds = "general:all", [0]
            cfg.model.height = cfg.model.width = 1024
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    validate(cfg)
    return cfg, trained

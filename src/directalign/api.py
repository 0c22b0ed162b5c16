"""The Python API for notebooks and scripts.

    import directalign as da
    cfg = da.load_config("tiny-srpo", overrides=["train.steps=50"])   # a shipped name or a YAML path
    run = da.train(cfg)                       # RunResult: run_dir, summary
    pipe = run.pipeline()                     # the fine-tuned diffusers FluxPipeline
    images = pipe(["a red circle on a blue background"], height=32, width=32, output_type="pt").images
"""

from __future__ import annotations

from pathlib import Path


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None):
    """A validated :class:`directalign.config.Config` from a shipped config name, a YAML path or a dict."""
    from .config import build_config, resolve_config_path
    from .engine.config import load_yaml

    if isinstance(source, dict):
        return build_config(source, overrides)
    return build_config(load_yaml(resolve_config_path(None if source is None else str(source))), overrides)


def train(config=None, *, resume: bool = False, overwrite: bool = False, log=print):
    """Train from a Config (or anything :func:`load_config` accepts); returns a ``RunResult``."""
    from .config import Config
    from .training import train as _train

    cfg = config if isinstance(config, Config) else load_config(config)
    return _train(cfg, resume=resume, overwrite=overwrite, log=log)

"""Loaders for the shipped tiny world (no network, nothing but the package)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

# Sampling settings the quality gates are measured at (docs/tiny-world.md).
DEFAULT_STEPS = 16
DEFAULT_GUIDANCE = 5.0


def world_dir() -> Path:
    """Directory of the shipped weights: ``generator/`` (diffusers) and ``reward/`` (transformers).

    ``DIRECTALIGN_WORLD_DIR`` points elsewhere (a freshly rebuilt world, for example).
    """
    override = os.environ.get("DIRECTALIGN_WORLD_DIR")
    path = Path(override) if override else Path(str(resources.files("directalign"))) / "assets" / "tiny-world"
    if not (path / "generator" / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the tiny world's weights are missing under {path}; reinstall directalign or rebuild them with "
            "`python -m directalign.world.build --out <dir>`"
        )
    return path


def generator_dir() -> Path:
    return world_dir() / "generator"


def reward_dir() -> Path:
    return world_dir() / "reward"


def load_pipeline(dtype=None):
    """The tiny ``FluxPipeline`` (fp32 on CPU), loaded offline from the shipped weights."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.utils import logging as dlogging

    from ..compat import dtype_kwargs

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # the word-level tokenizers are not CLIPTokenizer/T5TokenizerFast: a type warning
    try:
        pipe = FluxPipeline.from_pretrained(generator_dir(), **dtype_kwargs(dtype or torch.float32),
                                            local_files_only=True)
    finally:
        dlogging.set_verbosity(level)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_reward():
    """The tiny world's text-conditioned reward as a :class:`directalign.rewards.clip.CLIPReward` (cosine score)."""
    from ..rewards.clip import CLIPReward

    return CLIPReward.from_pretrained(reward_dir(), name="tiny-world")

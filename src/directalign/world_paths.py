"""Where the shipped tiny world's weights live (``DIRECTALIGN_WORLD_DIR`` points elsewhere).

It imports nothing of directalign, so every room can find the tiny world without importing the world package:
the reward registry (:mod:`directalign.rewards.registry`, ``reward.kind=tiny-world``) and the world's own loaders
(:mod:`directalign.world.load`) both ask here.
"""

from __future__ import annotations

import os
from pathlib import Path

WORLD_DIR_ENV = "DIRECTALIGN_WORLD_DIR"
SHIPPED_WORLD_DIR = Path(__file__).resolve().parent / "assets" / "tiny-world"


def world_dir() -> Path:
    """Directory of the tiny world's weights: ``generator/`` (diffusers) and ``reward/`` (transformers).

    ``DIRECTALIGN_WORLD_DIR`` points elsewhere (a freshly rebuilt world, for example).
    """
    override = os.environ.get(WORLD_DIR_ENV)
    path = Path(override) if override else SHIPPED_WORLD_DIR
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

"""Loaders for the shipped tiny world (no network, nothing but the package)."""

from __future__ import annotations

from ..world_paths import generator_dir, reward_dir, world_dir  # noqa: F401  (re-exported; DIRECTALIGN_WORLD_DIR)

# Sampling settings the quality gates are measured at (docs/tiny-world.md).
DEFAULT_STEPS = 16
DEFAULT_GUIDANCE = 5.0


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
    """The tiny world's text-conditioned reward as a :class:`directalign.rewards.clip.CLIPReward` (cosine score):
    ``reward.kind=tiny-world`` of the reward registry, loaded from :func:`reward_dir`."""
    from ..rewards.registry import build_reward

    return build_reward("tiny-world", "tiny-world")

"""Reward-to-loss maps, as small pure functions."""

from __future__ import annotations

import torch

LOSSES = ("hinge", "linear")


def reward_loss(reward: torch.Tensor, kind: str, threshold: float = 0.7) -> torch.Tensor:
    """Per-sample loss (B,) from a reward (B,).

    * ``hinge``: ReFL's ``relu(threshold - r)`` (official SRPO code, threshold 0.7): no gradient once r >= threshold;
    * ``linear``: ``-r`` (the newer Qwen-Image code).
    """
    if kind == "hinge":
        return torch.relu(threshold - reward)
    if kind == "linear":
        return -reward
    raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")

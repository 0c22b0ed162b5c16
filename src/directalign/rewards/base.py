"""The reward interface: images in [0, 1] plus prompts -> scores, differentiable with respect to the images.

A reward is split in two so SRPO can score one image under several texts (the prompt with a positive control word
and with a negative one) while running the image tower once:

    state = reward.encode_images(images)      # (B, 3, H, W) in [0, 1] -> anything, differentiable
    scores = reward.score_texts(state, texts)  # list of B strings -> (B,)

``reward(images, prompts)`` does both. Image-only rewards ignore the texts and set ``text_conditioned = False``.
Reward weights are frozen: gradients flow through a reward to the images, never into it.

Two hooks let a trainer log a reward without knowing its type: :meth:`Reward.describe` (a one-line statement of
the score, or None) and :meth:`Reward.step_metrics` (numbers from the last scoring call, e.g. a weighted sum's
per-term means).
"""

from __future__ import annotations

import torch
from torch import nn


class Reward(nn.Module):
    text_conditioned: bool = True
    name: str = "reward"

    def encode_images(self, images: torch.Tensor):
        raise NotImplementedError

    def score_texts(self, image_state, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.score_texts(self.encode_images(images), prompts)

    def describe(self) -> str | None:
        """One line stating how the score is computed, worth logging once; None when the name says it all."""
        return None

    def step_metrics(self) -> dict[str, float]:
        """Scalars about the last scoring call to log with the training step (plain floats, detached); none here."""
        return {}

    def freeze(self) -> "Reward":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

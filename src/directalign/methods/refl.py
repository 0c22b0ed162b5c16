"""ReFL (Xu et al. 2023, "ImageReward", arXiv 2304.05977), on a rectified-flow model.

Per step (ImageReward's ``ReFL.py``, translated from DDPM to the flow convention of :mod:`directalign.flow`):

1. draw k ~ U{lo, ..., hi} (``refl.step_range``) on the rollout schedule ``sigma_0 = 1 > ... > sigma_N = 0``;
2. integrate the ODE from the noise without gradient for k steps, to ``x_k`` at ``sigma_k``;
3. one differentiable model call at ``(x_k, sigma_k)`` and the one-step prediction ``x0_hat = x_k - sigma_k * v``;
4. decode, reward ``r``, loss ``loss_scale * relu(threshold - r)`` (``refl.loss = hinge``) or ``-r``; backward.

The model supplies the whole noise estimate, so the prediction is sharp only at late (small-sigma) steps, which is
why ReFL trains on a late window; Direct-Align instead recovers x0 with the known noise and can train early
(srpo-method-notes section 1.6).
"""

from __future__ import annotations

import random

import torch

from .common import RewardScorer, ode_chain, one_step_x0, schedule, velocity_fn
from .losses import reward_loss
from .srpo import BranchResult


def refl_loss(reward: torch.Tensor, kind: str, threshold: float, scale: float = 1.0) -> torch.Tensor:
    """The scalar ReFL loss of a batch of rewards (B,): ``scale * mean(relu(threshold - r))`` for ``hinge``,
    ``scale * mean(-r)`` for ``linear``."""
    return reward_loss(reward, kind, threshold).mean() * scale


class ReFL:
    """The ReFL recipe; ``cfg`` is a :class:`directalign.engine.config.Config`."""

    def __init__(self, cfg, adapter, reward):
        self.cfg, self.adapter, self.reward = cfg, adapter, reward
        self.sigmas = schedule(cfg.refl.rollout_steps, cfg.srpo.shift)
        self.score = RewardScorer(cfg, reward)

    def draw_step(self, generator: torch.Generator) -> int:
        lo, hi = self.cfg.refl.step_range
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    def accumulate_gradients(self, step: int, prompts: list[str], generator: torch.Generator,
                             rng: random.Random, noise: torch.Tensor | None = None, x0: torch.Tensor | None = None,
                             fresh_noise: torch.Tensor | None = None, backward=None) -> list[BranchResult]:
        r, m = self.cfg.refl, self.cfg.model
        backward = backward or (lambda loss: loss.backward())
        embeds = self.adapter.encode_prompts(prompts)
        if noise is None:
            noise = self.adapter.noise(len(prompts), m.height, m.width, generator)
        k = self.draw_step(generator)
        velocity = velocity_fn(self.adapter, embeds, r.guidance, m.height, m.width)
        x_k = ode_chain(noise, self.sigmas[: k + 1], velocity, grad=False)
        sigma_k = float(self.sigmas[k])
        v = velocity(x_k, torch.full((len(prompts),), sigma_k, device=x_k.device, dtype=x_k.dtype))
        images = self.adapter.decode(one_step_x0(x_k, v, sigma_k), m.height, m.width)
        rewards = self.score(images, prompts, step, rng)
        loss = refl_loss(rewards, r.loss, r.hinge_threshold, r.loss_scale)
        backward(loss)
        return [BranchResult("refl", float(loss.detach()), float(rewards.detach().mean()), sigma_k, 0.0, 0.0)]

    def nfe(self, batch: int) -> dict[str, float]:
        """Per optimizer step: k no-grad rollout calls (the expectation over the step range) and one with grad."""
        lo, hi = self.cfg.refl.step_range
        return {"nfe_no_grad": (lo + hi) / 2 * batch, "nfe_grad": 1 * batch}

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

from dataclasses import dataclass, field

import torch

from ..engine.config import choice, need
from ..engine.context import StepContext, StepOutput
from .base import Backward, BranchResult, MethodSpec, step_output
from .common import (
    RewardScorer,
    ode_chain,
    one_step_x0,
    schedule,
    step_noise,
    velocity_fn,
)
from .losses import reward_loss


@dataclass
class ReFLConfig:
    """ReFL (Xu et al. 2023, ImageReward): no-grad ODE rollout to a random late step k, one differentiable model
    call there, one-step x0 prediction ``x_k - sigma_k * v``, decode, reward, ``relu(threshold - r)``."""

    rollout_steps: int = 25  # SRPO paper: 25 rollout steps for its direct-propagation baselines
    guidance: float = 3.5  # FLUX.1-dev guidance embedding, rollout and differentiable call
    step_range: list[int] = field(default_factory=lambda: [19, 24])  # k ~ U{lo..hi} on the rollout schedule;
    #   ImageReward's ReFL.py: randint(30, 39) of 40 steps, scaled to 25 steps
    loss: str = choice("hinge", "linear")  # hinge relu(threshold - r) | linear -r
    hinge_threshold: float = 0.7  # SRPO code's HPS-scale threshold; ImageReward used 2 on its own score scale
    loss_scale: float = 1.0  # ImageReward's ReFL.py multiplies the loss by grad_scale = 1e-3

    def validate(self) -> None:
        need(self.rollout_steps >= 1, f"refl.rollout_steps: must be >= 1, got {self.rollout_steps}")
        need(len(self.step_range) == 2 and 0 <= self.step_range[0] <= self.step_range[1] < self.rollout_steps,
             f"refl.step_range: need [lo, hi] with 0 <= lo <= hi < refl.rollout_steps ({self.rollout_steps}), got "
             f"{self.step_range}")
        need(self.loss_scale > 0, f"refl.loss_scale: must be > 0, got {self.loss_scale}")



def refl_loss(reward: torch.Tensor, kind: str, threshold: float, scale: float = 1.0) -> torch.Tensor:
    """The scalar ReFL loss of a batch of rewards (B,): ``scale * mean(relu(threshold - r))`` for ``hinge``,
    ``scale * mean(-r)`` for ``linear``."""
    return reward_loss(reward, kind, threshold).mean() * scale


class ReFL:
    """The ReFL recipe; ``cfg`` is a :class:`directalign.config.Config`."""

    def __init__(self, cfg, adapter, reward):
        self.cfg, self.adapter, self.reward = cfg, adapter, reward
        self.sigmas = schedule(cfg.refl.rollout_steps, cfg.sampling.shift)
        self.score = RewardScorer(cfg, reward)

    def draw_step(self, generator: torch.Generator) -> int:
        lo, hi = self.cfg.refl.step_range
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    def train_step(self, ctx: StepContext, backward: Backward) -> StepOutput:
        step, prompts, generator, rng = ctx.step, list(ctx.prompts), ctx.generator(), ctx.python_rng()
        noise = step_noise(self.adapter, ctx, self.cfg.model.height, self.cfg.model.width)
        r, m = self.cfg.refl, self.cfg.model
        embeds = self.adapter.encode_prompts(prompts)
        k = self.draw_step(generator)
        velocity = velocity_fn(self.adapter, embeds, r.guidance, m.height, m.width)
        x_k = ode_chain(noise, self.sigmas[: k + 1], velocity, grad=False)
        sigma_k = float(self.sigmas[k])
        v = velocity(x_k, torch.full((len(prompts),), sigma_k, device=x_k.device, dtype=x_k.dtype))
        images = self.adapter.decode(one_step_x0(x_k, v, sigma_k), m.height, m.width)
        rewards = self.score(images, prompts, step, rng)
        loss = refl_loss(rewards, r.loss, r.hinge_threshold, r.loss_scale)
        backward(loss)
        return step_output([BranchResult("refl", float(loss.detach()), float(rewards.detach().mean()), sigma_k)])

    def nfe(self, batch: int) -> dict[str, float]:
        """Per optimizer step: k no-grad rollout calls (the expectation over the step range) and one with grad."""
        lo, hi = self.cfg.refl.step_range
        return {"nfe_no_grad": (lo + hi) / 2 * batch, "nfe_grad": 1 * batch}


SPEC = MethodSpec("refl", "refl", ReFLConfig, ReFL, "ReFL: no-grad rollout to a late step, one-step x0, hinge")

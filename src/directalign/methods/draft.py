"""DRaFT-K and DRaFT-LV (Clark, Vicol, Swersky, Fleet 2023, "Directly Fine-Tuning Diffusion Models on
Differentiable Rewards", arXiv 2309.17400), on a rectified-flow model with the deterministic Euler sampler.

* ``method: draft-k`` -- sample ``sigma_0 = 1 > ... > sigma_N = 0`` from the noise; the first ``N - K`` steps run
  without gradient and the last ``K`` keep it (each wrapped in ``torch.utils.checkpoint`` when
  ``draft.checkpoint``), so the reward gradient reaches the model only through those K calls; decode the final
  sample, loss ``-r`` (``draft.loss = linear``; DRaFT maximises the reward), backward. K = N is full DRaFT.
* ``method: draft-lv`` -- the K = 1 low-variance estimator: sample all N steps without gradient to ``x0``, then
  ``n = draft.lv_samples`` times re-noise it to the last step's level, ``x_1 = s_1 * eps_i + (1 - s_1) * x0`` with
  fresh ``eps_i``, denoise that one step with gradient (``x0_i = x_1 - s_1 * v``), and average the n losses
  (each copy calls backward on ``loss_i / n``, so the gradients are averaged without holding n graphs).

No official DRaFT code is public (landscape notes); this follows the paper's description.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .. import flow
from ..engine.config import choice, need
from ..engine.context import StepContext, StepOutput
from .base import Backward, BranchResult, MethodSpec, step_output
from .common import (
    RewardScorer,
    ode_chain,
    one_step_x0,
    randn_like,
    schedule,
    step_noise,
    velocity_fn,
)
from .losses import reward_loss


@dataclass
class DRaFTConfig:
    """DRaFT (Clark et al. 2023, arXiv 2309.17400). ``method: draft-k`` backpropagates through the last ``k``
    sampler steps; ``method: draft-lv`` samples without gradient, re-noises the final sample ``lv_samples`` times to
    the last step's sigma and averages the one-step-denoise gradients."""

    sampling_steps: int = 25
    guidance: float = 3.5
    k: int = 1  # draft-k: differentiable last steps
    lv_samples: int = 2  # draft-lv: re-noised copies n
    checkpoint: bool = True  # torch.utils.checkpoint around each differentiable step (draft-k with k > 1)
    loss: str = choice("linear", "hinge")  # DRaFT maximises the reward: -r | hinge
    hinge_threshold: float = 0.7

    def validate(self) -> None:
        need(self.sampling_steps >= 1, f"draft.sampling_steps: must be >= 1, got {self.sampling_steps}")
        need(1 <= self.k <= self.sampling_steps,
             f"draft.k: must be in [1, draft.sampling_steps = {self.sampling_steps}], got {self.k}")
        need(self.lv_samples >= 1, f"draft.lv_samples: must be >= 1, got {self.lv_samples}")



def lv_copies(x0: torch.Tensor, sigma_last: float, noises: list[torch.Tensor], velocity) -> list[torch.Tensor]:
    """DRaFT-LV's re-noised one-step denoisings of a (detached) final sample: for each noise ``eps_i``,
    ``x_1 = sigma_last * eps_i + (1 - sigma_last) * x0`` and ``x0_i = x_1 - sigma_last * v(x_1, sigma_last)``."""
    x0 = x0.detach()
    out = []
    for eps in noises:
        x1 = flow.interpolate(x0, eps, sigma_last)
        s = torch.full((x0.shape[0],), sigma_last, device=x0.device, dtype=x0.dtype)
        out.append(one_step_x0(x1, velocity(x1, s), sigma_last))
    return out


class DRaFT:
    """DRaFT-K (``method: draft-k``) and DRaFT-LV (``method: draft-lv``)."""

    def __init__(self, cfg, adapter, reward):
        self.cfg, self.adapter, self.reward = cfg, adapter, reward
        self.lv = cfg.method == "draft-lv"
        self.sigmas = schedule(cfg.draft.sampling_steps, cfg.sampling.shift)
        self.score = RewardScorer(cfg, reward)

    def _loss(self, x0: torch.Tensor, prompts: list[str], step: int, rng: random.Random):
        d, m = self.cfg.draft, self.cfg.model
        rewards = self.score(self.adapter.decode(x0, m.height, m.width), prompts, step, rng)
        return reward_loss(rewards, d.loss, d.hinge_threshold).mean(), rewards

    def train_step(self, ctx: StepContext, backward: Backward) -> StepOutput:
        step, prompts, generator, rng = ctx.step, list(ctx.prompts), ctx.generator(), ctx.python_rng()
        noise = step_noise(self.adapter, ctx, self.cfg.model.height, self.cfg.model.width)
        d, m = self.cfg.draft, self.cfg.model
        embeds = self.adapter.encode_prompts(prompts)
        velocity = velocity_fn(self.adapter, embeds, d.guidance, m.height, m.width)
        n_steps = d.sampling_steps
        if not self.lv:
            k = d.k
            x = ode_chain(noise, self.sigmas[: n_steps - k + 1], velocity, grad=False)
            x0_final = ode_chain(x, self.sigmas[n_steps - k :], velocity, grad=True, checkpoint=d.checkpoint)
            loss, rewards = self._loss(x0_final, prompts, step, rng)
            backward(loss)
            return step_output([BranchResult("draft_k", float(loss.detach()), float(rewards.detach().mean()),
                                             float(self.sigmas[n_steps - k]))])
        x0_final = ode_chain(noise, self.sigmas, velocity, grad=False)
        s1 = float(self.sigmas[n_steps - 1])
        n = d.lv_samples
        total, reward_sum = 0.0, 0.0
        for _ in range(n):  # one graph at a time: draw, denoise, backward
            (x0_i,) = lv_copies(x0_final, s1, [randn_like(x0_final, generator)], velocity)
            loss, rewards = self._loss(x0_i, prompts, step, rng)
            loss = loss / n
            backward(loss)
            total += float(loss.detach())
            reward_sum += float(rewards.detach().mean())
        return step_output([BranchResult("draft_lv", total, reward_sum / n, s1)])

    def nfe(self, batch: int) -> dict[str, float]:
        d = self.cfg.draft
        if self.lv:
            return {"nfe_no_grad": d.sampling_steps * batch, "nfe_grad": d.lv_samples * batch}
        return {"nfe_no_grad": (d.sampling_steps - d.k) * batch, "nfe_grad": d.k * batch}


DRAFT_K_SPEC = MethodSpec("draft-k", "draft", DRaFTConfig, DRaFT, "DRaFT-K: backprop through the last K steps")
DRAFT_LV_SPEC = MethodSpec("draft-lv", "draft", DRaFTConfig, DRaFT,
                           "DRaFT-LV: K=1 with n re-noised copies of the final sample")

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

import torch

from .. import flow
from .common import RewardScorer, ode_chain, one_step_x0, randn_like, schedule, velocity_fn
from .losses import reward_loss
from .srpo import BranchResult


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
        self.sigmas = schedule(cfg.draft.sampling_steps, cfg.srpo.shift)
        self.score = RewardScorer(cfg, reward)

    def _loss(self, x0: torch.Tensor, prompts: list[str], step: int, rng: random.Random):
        d, m = self.cfg.draft, self.cfg.model
        rewards = self.score(self.adapter.decode(x0, m.height, m.width), prompts, step, rng)
        return reward_loss(rewards, d.loss, d.hinge_threshold).mean(), rewards

    def accumulate_gradients(self, step: int, prompts: list[str], generator: torch.Generator,
                             rng: random.Random, noise: torch.Tensor | None = None, x0: torch.Tensor | None = None,
                             fresh_noise: torch.Tensor | None = None, backward=None) -> list[BranchResult]:
        d, m = self.cfg.draft, self.cfg.model
        backward = backward or (lambda loss: loss.backward())
        embeds = self.adapter.encode_prompts(prompts)
        if noise is None:
            noise = self.adapter.noise(len(prompts), m.height, m.width, generator)
        velocity = velocity_fn(self.adapter, embeds, d.guidance, m.height, m.width)
        n_steps = d.sampling_steps
        if not self.lv:
            k = d.k
            x = ode_chain(noise, self.sigmas[: n_steps - k + 1], velocity, grad=False)
            x0_final = ode_chain(x, self.sigmas[n_steps - k :], velocity, grad=True, checkpoint=d.checkpoint)
            loss, rewards = self._loss(x0_final, prompts, step, rng)
            backward(loss)
            return [BranchResult("draft_k", float(loss.detach()), float(rewards.detach().mean()),
                                 float(self.sigmas[n_steps - k]), 0.0, 0.0)]
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
        return [BranchResult("draft_lv", total, reward_sum / n, s1, 0.0, 0.0)]

    def nfe(self, batch: int) -> dict[str, float]:
        d = self.cfg.draft
        if self.lv:
            return {"nfe_no_grad": d.sampling_steps * batch, "nfe_grad": d.lv_samples * batch}
        return {"nfe_no_grad": (d.sampling_steps - d.k) * batch, "nfe_grad": d.k * batch}

"""Direct-Align + SRPO: one training step, as a readable recipe over the adapter, the reward and the flow math.

Per step (srpo-method-notes section 7):

1. rollout without gradient from noise eps to x0 (or, offline, x0 = VAE(real image) and fresh eps);
2. draw a window position m on the fine sigma grid, K = the model's share, both branches' sigmas;
3. denoise branch: inject eps into x0 at the noisier sigma, one differentiable model step down, closed-form x0_hat,
   decode, reward ``(1 + k_pos) s(pos) - s(neg)``, loss, backward;
4. inversion branch: inject at the cleaner sigma, one step up, recover, reward with the words swapped
   ``(1 + k_inv) s(neg) - s(pos)``, loss, backward;
5. (the engine) clip, optimizer step.

Each branch calls ``backward`` on its own share of the loss, as gradient accumulation, so only one branch's
activations are alive at a time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .. import flow
from ..adapters.base import PromptEmbeds
from ..rewards.relative import ControlWords, semantic_relative_reward
from .losses import reward_loss
from .sampling import rollout


@dataclass
class BranchResult:
    name: str
    loss: float
    reward: float
    sigma_query: float
    sigma_target: float
    k: float


class SRPO:
    """The Direct-Align / SRPO recipe; ``cfg`` is a :class:`directalign.engine.config.Config`."""

    def __init__(self, cfg, adapter, reward):
        self.cfg = cfg
        self.adapter = adapter
        self.reward = reward
        s = cfg.srpo
        self.grid = flow.training_sigma_grid(s.schedule_steps, s.shift, s.window[0], s.window[1], s.grid_points)
        self.control = ControlWords(tuple(cfg.reward.positive_words), tuple(cfg.reward.negative_words),
                                    cfg.reward.selection)
        self.form = "absolute" if cfg.method == "direct-align" else cfg.reward.form

    # ------------------------------------------------------------------------------------------------ pieces
    def clean_latents(self, embeds: PromptEmbeds, noise: torch.Tensor) -> torch.Tensor:
        s, m = self.cfg.srpo, self.cfg.model
        return rollout(self.adapter, embeds, noise, s.rollout_steps, s.shift, s.rollout_guidance, m.height, m.width,
                       s.quantize_timestep)

    def _velocity_fn(self, embeds: PromptEmbeds):
        s, m = self.cfg.srpo, self.cfg.model

        def velocity(x, sigma):
            return self.adapter.velocity(x, flow.quantize_sigma(sigma, s.quantize_timestep), embeds,
                                         s.train_guidance, m.height, m.width)

        return velocity

    def _k_and_weight(self, index: int, ramp: list[float]) -> tuple[float, float]:
        """(k for the reward form, multiplicative weight) at a grid position, per ``srpo.discount_mode``."""
        s = self.cfg.srpo
        if s.discount_mode == "k":
            return flow.linear_ramp(ramp[0], ramp[1], s.grid_points, index), 1.0
        return 0.0, flow.multiplicative_discount(s.grid_points, index, s.multiplicative_shift)

    def branch_loss(self, name: str, x0, noise, embeds, prompts, draw: flow.WindowDraw, words: tuple[str, str],
                    share: float) -> tuple[torch.Tensor, BranchResult]:
        s, m = self.cfg.srpo, self.cfg.model
        if name == "denoise":
            sq, st, swap = draw.denoise_query, draw.denoise_target, False
            k, weight = self._k_and_weight(draw.m, s.discount_pos)
        else:
            sq, st, swap = draw.inversion_query, draw.inversion_target, True
            k, weight = self._k_and_weight(draw.m_inversion, s.discount_inv)
        x0_hat = flow.direct_align_x0(x0, noise, sq, st, self._velocity_fn(embeds))
        images = self.adapter.decode(x0_hat, m.height, m.width)
        r = semantic_relative_reward(self.reward, images, prompts, self.form, k, words[0], words[1], swap=swap)
        r = weight * r
        loss = reward_loss(r, s.loss, s.hinge_threshold).mean() * share
        return loss, BranchResult(name, float(loss.detach()), float(r.detach().mean()), sq, st, k)

    # ------------------------------------------------------------------------------------------------ one step
    def accumulate_gradients(self, step: int, prompts: list[str], generator: torch.Generator,
                             rng: random.Random, noise: torch.Tensor | None = None,
                             x0: torch.Tensor | None = None, fresh_noise: torch.Tensor | None = None,
                             backward=None) -> list[BranchResult]:
        """Run every Direct-Align pass of one step, calling ``backward(loss)`` after each; returns their metrics.

        ``noise``/``x0``/``fresh_noise`` may be given (noise drawn for the global batch and sliced per rank, offline
        real images); otherwise they are drawn from ``generator`` and the rollout. Window positions always come from
        ``generator``.
        """
        s, m = self.cfg.srpo, self.cfg.model
        embeds = self.adapter.encode_prompts(prompts)
        if noise is None:
            noise = self.adapter.noise(len(prompts), m.height, m.width, generator)
        if x0 is None:
            x0 = self.clean_latents(embeds, noise)
        if s.noise_prior == "fresh":
            if fresh_noise is None:
                fresh_noise = torch.randn(noise.shape, generator=generator, dtype=torch.float32)
            noise = fresh_noise.to(noise)
        words = self.control.pick(step, rng) if self.form != "absolute" else ("", "")
        branches = [b for b, on in (("denoise", s.denoise_branch), ("inversion", s.inversion_branch)) if on]
        share = 1.0 / (len(branches) * s.samples_per_rollout)
        results = []
        backward = backward or (lambda loss: loss.backward())
        for _ in range(s.samples_per_rollout):
            draw = flow.draw_window(self.grid, s.groundtruth_ratio, generator, s.window_margin)
            for name in branches:
                loss, res = self.branch_loss(name, x0, noise, embeds, prompts, draw, words, share)
                backward(loss)
                results.append(res)
        return results

    def nfe(self, batch: int) -> dict[str, int]:
        """Model evaluations per optimizer step (per process): rollout without grad, Direct-Align with grad."""
        s = self.cfg.srpo
        branches = int(s.denoise_branch) + int(s.inversion_branch)
        return {"nfe_no_grad": s.rollout_steps * batch, "nfe_grad": branches * s.samples_per_rollout * batch}

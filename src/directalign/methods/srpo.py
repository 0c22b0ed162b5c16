"""Direct-Align + SRPO: one training step, as a readable recipe over the adapter, the reward and the flow math.

Per step (srpo-method-notes section 7):

1. rollout without gradient from noise eps to x0 (or, offline, x0 = VAE(real image) and fresh eps);
2. draw a window position m on the fine sigma grid, K = the model's share, both branches' sigmas;
3. denoise branch: inject eps into x0 at the noisier sigma, one differentiable model step down, closed-form x0_hat,
   decode, reward ``(1 + k_pos) s(pos) - s(neg)``, loss, backward;
4. inversion branch: inject at the cleaner sigma, one step up, recover, reward with the words swapped
   ``(1 + k_inv) s(neg) - s(pos)``, loss, backward;
5. (the engine) reduce gradients over ranks, clip, optimizer step.

Each branch calls ``backward`` on its own share of the loss, as gradient accumulation, so only one branch's
activations are alive at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .. import flow
from ..adapters.base import PromptEmbeds
from ..data import load_offline
from ..engine.config import choice, need
from ..engine.context import STREAM_NOISE, PromptSampler, StepContext, StepOutput
from ..rewards.relative import ControlWords, semantic_relative_reward
from .base import Backward, BranchResult, MethodSpec, step_output
from .losses import reward_loss
from .rollout_buffer import Rollout, RolloutBuffer
from .sampling import rollout

log = logging.getLogger("directalign")


@dataclass
class SRPOConfig:
    """``srpo:`` (methods ``srpo`` and ``direct-align``); official values from the SRPO code (arXiv 2509.06942)."""

    rollout_steps: int = 25  # official sampling_steps
    rollout_guidance: float = 1.0  # official HPS script (PickScore script: 2)
    train_guidance: float = 3.5  # official hard-codes 3.5 in the differentiable forward
    # rollout (official: the rollout's own initial noise) | fresh
    noise_prior: str = choice("rollout", "fresh")
    share_noise_across_ranks: bool = True  # official broadcasts rank 0's noise; false: each rank its own slice
    share_window_across_ranks: bool = False  # official draws m per rank (seed + rank); true: one m for all ranks
    schedule_steps: int = 50  # the inference schedule t0/t1 index into (official vis_sampling_step)
    window: list[int] = field(default_factory=lambda: [5, 25])  # official train_timestep (HPS script)
    grid_points: int = 1000  # official timestep_length
    groundtruth_ratio: float = 0.9  # official; model share Delta-sigma ~ 0.0215 on the HPS window
    window_margin: int = 5  # m ~ U{margin, N - margin}
    denoise_branch: bool = True
    inversion_branch: bool = True
    # k (official FLUX: k in (1+k)pos - neg) | multiplicative (Qwen code)
    discount_mode: str = choice("k", "multiplicative")
    discount_pos: list[float] = field(default_factory=lambda: [0.1, 0.25])
    discount_inv: list[float] = field(default_factory=lambda: [0.3, 0.01])
    multiplicative_shift: float = 3.0
    loss: str = choice("hinge", "linear")  # hinge relu(tau - r) (official, after ReFL) | linear -r
    hinge_threshold: float = 0.7
    quantize_timestep: int = 1000  # official int(sigma*1000)/1000; 0 = off
    samples_per_rollout: int = 1  # Direct-Align draws per branch from one rollout
    rollout_reuse: int = 1  # optimizer steps fed by one online rollout, each at its own window draw (1 = official)
    offline_data: str = ""  # folder of images with captions (or a jsonl manifest); empty = online
    offline_until_step: int = -1  # switch to online rollouts at this step; -1 = offline for the whole run

    def validate(self) -> None:
        need(self.rollout_steps >= 1, f"srpo.rollout_steps: must be >= 1, got {self.rollout_steps}")
        need(self.schedule_steps >= 2, f"srpo.schedule_steps: must be >= 2, got {self.schedule_steps}")
        need(len(self.window) == 2, f"srpo.window: need two indices [t0, t1], got {self.window}")
        t0, t1 = self.window
        need(0 <= t0 < t1 <= self.schedule_steps,
             f"srpo.window: need 0 <= t0 < t1 <= srpo.schedule_steps ({self.schedule_steps}), got [{t0}, {t1}]")
        need(t0 >= 1, "srpo.window: t0 = 0 trains at sigma = 1 (pure noise), which cannot be recovered; use t0 >= 1")
        need(0 <= self.groundtruth_ratio < 1, f"srpo.groundtruth_ratio: must be in [0, 1), got {self.groundtruth_ratio}")
        need(self.window_margin >= 1, f"srpo.window_margin: must be >= 1, got {self.window_margin}")
        need(self.grid_points >= 2 * self.window_margin + 2,
             f"srpo.grid_points: must be >= 2 * window_margin + 2 = {2 * self.window_margin + 2}, got "
             f"{self.grid_points}")
        need(self.denoise_branch or self.inversion_branch,
             "srpo.denoise_branch/inversion_branch: both are off; enable at least one")
        need(len(self.discount_pos) == 2 and len(self.discount_inv) == 2,
             "srpo.discount_pos/discount_inv: need [start, end] pairs")
        need(self.multiplicative_shift > 0, f"srpo.multiplicative_shift: must be > 0, got {self.multiplicative_shift}")
        need(self.quantize_timestep >= 0, f"srpo.quantize_timestep: must be >= 0, got {self.quantize_timestep}")
        need(self.samples_per_rollout >= 1, f"srpo.samples_per_rollout: must be >= 1, got {self.samples_per_rollout}")
        need(self.rollout_reuse >= 1, f"srpo.rollout_reuse: must be >= 1, got {self.rollout_reuse}")
        need(self.offline_until_step >= -1, f"srpo.offline_until_step: must be >= -1, got {self.offline_until_step}")


def reward_form(cfg) -> str:
    """The reward form SRPO trains with: ``reward.form``, or ``absolute`` for plain Direct-Align."""
    return "absolute" if cfg.method == "direct-align" else cfg.reward.form


def held_out_form(cfg) -> tuple[str, float]:
    """(form, k) of the held-out reward of an SRPO run: k is the mean of ``discount_pos`` in the k mode, 0 in the
    multiplicative mode (whose weight scales the reward, not the contrast)."""
    s = cfg.srpo
    k = 0.0 if s.discount_mode == "multiplicative" else (s.discount_pos[0] + s.discount_pos[1]) / 2
    return reward_form(cfg), k


class SRPO:
    """The Direct-Align / SRPO recipe; ``cfg`` is a :class:`directalign.config.Config` with an ``srpo`` section."""

    def __init__(self, cfg, adapter, reward):
        self.cfg = cfg
        self.adapter = adapter
        self.reward = reward
        s = cfg.srpo
        self.grid = flow.training_sigma_grid(s.schedule_steps, cfg.sampling.shift, s.window[0], s.window[1],
                                             s.grid_points)
        self.control = ControlWords(tuple(cfg.reward.positive_words), tuple(cfg.reward.negative_words),
                                    cfg.reward.selection)
        self.form = reward_form(cfg)
        self.offline = load_offline(s.offline_data, cfg.model.height, cfg.model.width) if s.offline_data else None
        if self.offline is not None:
            log.info("offline mode: %d real images from %s", len(self.offline), s.offline_data)
        self.buffer = RolloutBuffer(s.rollout_reuse)
        self._device = getattr(adapter, "device", torch.device("cpu"))

    # ------------------------------------------------------------------------------------------------ pieces
    def clean_latents(self, embeds: PromptEmbeds, noise: torch.Tensor) -> torch.Tensor:
        s, m = self.cfg.srpo, self.cfg.model
        return rollout(self.adapter, embeds, noise, s.rollout_steps, self.cfg.sampling.shift, s.rollout_guidance,
                       m.height, m.width, s.quantize_timestep)

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

    def step_inputs(self, ctx: StepContext) -> tuple[list[str], torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(prompts, x0 or None, rollout noise, fresh noise or None) of this rank for step ``ctx.step``.

        Noise for the whole global batch comes from one generator every rank seeds alike: shared noise takes the
        first slice on every rank (official), per-rank noise takes the rank's own slice (a 2-process run with batch
        b then sees exactly the noise of a 1-process run with batch 2b).
        """
        s, m = self.cfg.srpo, self.cfg.model
        b = ctx.batch_size
        mine = slice(0, b) if s.share_noise_across_ranks else ctx.rows
        gen_noise = ctx.generator(STREAM_NOISE, shared=True)
        if self.offline is not None and (s.offline_until_step < 0 or ctx.step < s.offline_until_step):
            # Offline SRPO: the real image is x0 and the noise is fresh (maintainer's recipe, SRPO issue #10)
            sampler = PromptSampler(list(range(len(self.offline))), b, ctx.seed, True, ctx.rank, ctx.world_size)
            idx = sampler.batch(ctx.step)
            x0 = self.adapter.encode_images(self.offline.images[idx])
            noise = torch.randn((ctx.global_batch, *x0.shape[1:]), generator=gen_noise)[mine].to(x0)
            return [self.offline.captions[i] for i in idx], x0, noise, None
        noise = self.adapter.noise(ctx.global_batch, m.height, m.width, gen_noise)
        fresh = torch.randn(noise.shape, generator=gen_noise)[mine] if s.noise_prior == "fresh" else None
        return list(ctx.prompts), None, noise[mine], fresh

    # ------------------------------------------------------------------------------------------------ one step
    def train_step(self, ctx: StepContext, backward: Backward) -> StepOutput:
        """Run every Direct-Align pass of one step, calling ``backward(loss)`` after each."""
        s = self.cfg.srpo
        prompts, x0, noise, fresh_noise = self.step_inputs(ctx)
        generator = ctx.generator(shared=s.share_window_across_ranks)  # window positions
        reused = self.buffer.get(ctx.step) if x0 is None else None
        if reused is not None:  # srpo.rollout_reuse: this step trains on the last rollout's pair at a new window
            prompts, x0, noise = reused.prompts, reused.x0, reused.noise
        embeds = self.adapter.encode_prompts(prompts)
        if x0 is None:
            x0 = self.clean_latents(embeds, noise)
            self.buffer.put(Rollout(ctx.step, prompts, x0, noise))
        if s.noise_prior == "fresh" and fresh_noise is not None:
            noise = fresh_noise.to(noise)
        words = self.control.pick(ctx.step, ctx.python_rng()) if self.form != "absolute" else ("", "")
        branches = [b for b, on in (("denoise", s.denoise_branch), ("inversion", s.inversion_branch)) if on]
        share = 1.0 / (len(branches) * s.samples_per_rollout)
        results = []
        for _ in range(s.samples_per_rollout):
            draw = flow.draw_window(self.grid, s.groundtruth_ratio, generator, s.window_margin)
            for name in branches:
                loss, res = self.branch_loss(name, x0, noise, embeds, prompts, draw, words, share)
                backward(loss)
                results.append(res)
        return step_output(results, with_k=True)

    def nfe(self, batch: int) -> dict[str, int]:
        """Model evaluations per optimizer step (per process): rollout without grad, Direct-Align with grad."""
        s = self.cfg.srpo
        branches = int(s.denoise_branch) + int(s.inversion_branch)
        online = self.offline is None or s.offline_until_step >= 0
        # one rollout feeds rollout_reuse steps: its forwards are spread over them (exact over whole periods)
        rollout_nfe = s.rollout_steps * batch / s.rollout_reuse if online else 0
        return {"nfe_no_grad": rollout_nfe, "nfe_grad": branches * s.samples_per_rollout * batch}

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rollout held for reuse (``srpo.rollout_reuse`` > 1), so a resume between rollouts is exact."""
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.buffer.load_state_dict(state, rank, self._device)


SRPO_SPEC = MethodSpec("srpo", "srpo", SRPOConfig, SRPO,
                       "Direct-Align + semantic relative reward (the flagship; docs/srpo.md)", held_out_form)
DIRECT_ALIGN_SPEC = MethodSpec("direct-align", "srpo", SRPOConfig, SRPO,
                               "Direct-Align with the absolute reward (no control words)", held_out_form)

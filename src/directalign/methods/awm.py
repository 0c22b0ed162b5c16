"""Advantage Weighted Matching (AWM; Xue et al. 2025, arXiv 2509.25050): the pretraining flow-matching loss on the
policy's own samples, each sample weighted by its group-relative advantage, with KL terms to the base model and to
an EMA of the policy. Public code: ``scxue/advantage_weighted_matching@be51372``
``advantage_weighted_matching/scripts/train_sd3_awm.py`` and ``config/dgx_awm.py`` (``pickscore_sd3_no_cfg_1node``).

One step:

1. each prompt is sampled ``group_size`` times with the current policy, without gradient (the code: SA-Solver with
   noise level 0 for PickScore, i.e. deterministic; here the Euler ODE, or Flow-GRPO's SDE with ``sampler: sde``);
2. rewards, then flow_grpo's per-prompt advantages ``(r - mean_prompt) / (std + 1e-4)`` with the batch's std
   (``global_std``), clipped to ``+-adv_clip_max`` and scaled by ``advantage_max / adv_clip_max`` (to [-1, 1]);
3. ``train_timesteps`` step indices of the sampling schedule, stratified over ``[0, int(N * timestep_fraction))``
   (``time_type: discrete``; ``discrete_wo_init`` starts at 1), the same for every sample; at each a fresh eps per
   sample, ``x_s = s eps + (1 - s) x0`` and the velocity error ``mse = mean((v - (eps - x0))^2)``, weighted
   (``weighting``): ``uniform`` mse, ``t`` s * mse, ``ghuber`` ((mse + 1e-10)^p - 1e-10^p) * s / p;
4. the loss ``mean_{t,i}(A_i * w(mse_{t,i})) + beta * mean((v - v_base)^2) + ema_beta * mean((v - v_ema)^2)``,
   each timestep's share backwarded on its own.

The code writes step 4 as PPO on ``log p = -w(mse)``: ``mean(max(-A ratio, -A clip(ratio, 1 +- 1)))`` with
``ratio = exp(log p - log p_old)``. It makes one optimizer step per rollout ("for on policy, we additionally // 2"),
so ``ratio = 1`` and its gradient is exactly that of ``mean(A * w(mse))``: we optimise that form, whose value (the
advantage-weighted matching loss) is also what ``loss`` logs. The EMA policy (the code's ``ema`` LoRA branch, "an
adaptive KL regularization") starts as the initial weights and after each optimizer step becomes
``decay * ema + (1 - decay) * policy`` with ``decay = min(ema_decay, ema_decay_ramp * steps_done)`` (the code's
``kl_ema_decay_type: linear``); it is state across steps, saved in every checkpoint (``state_dict``) and restored on
resume. Differences on purpose: Euler ODE instead of SA-Solver; the code's first two epochs, which only sample, are
not reproduced; ``train.ema_decay`` is the evaluation EMA (the code's ``train.ema``, decay 0.99).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import flow
from ..engine.config import choice, need
from ..engine.context import StepContext, StepOutput
from .base import Backward, MethodSpec
from .common import RewardScorer, randn_like, schedule, step_noise
from .matching import (
    BaseReference,
    WeightSnapshot,
    flow_matching_mse,
    group_noise,
    per_prompt_advantages,
    sample_group,
    train_velocity,
    zero_std_fraction,
)

STREAM_DRAWS = 13  # the (timestep, eps) draws of the loss: a seed stream of their own (engine/context.py streams)


@dataclass
class AWMConfig:
    """``awm:``; defaults are the AWM code's SD3.5-M PickScore config (``pickscore_sd3_no_cfg_1node``)."""

    sampling_steps: int = 14  # sample.num_steps
    guidance: float = 1.0  # sample.guidance_scale (no CFG)
    sampler: str = choice("ode", "sde")  # ode: Euler (the code: SA-Solver, noise level 0) | sde: Flow-GRPO's SDE
    eta: float = 0.4  # sde noise level (the code's GenEval / OCR configs: 0.4)
    group_size: int = 24  # sample.num_image_per_prompt
    same_initial_noise: bool = False
    train_timesteps: int = 6  # train.train_timesteps
    timestep_fraction: float = 0.9  # train.timestep_fraction
    time_type: str = choice("discrete", "discrete_wo_init")  # PickScore: discrete; GenEval / OCR: discrete_wo_init
    weighting: str = choice("ghuber", "uniform", "t")  # train.weighting
    ghuber_power: float = 0.25  # train.ghuber_power
    train_guidance: float = 1.0  # train.cfg = False
    adv_clip_max: float = 5.0  # train.adv_clip_max
    advantage_max: float = 1.0  # train.advantage_max: advantages scaled to [-advantage_max, advantage_max]
    advantage_eps: float = 1.0e-4  # flow_grpo stat tracker
    global_std: bool = True  # sample.global_std
    beta: float = 1.0e-4  # train.beta: KL to the base model (PickScore 1e-4, GenEval 1e-3, OCR 3e-3)
    ema_beta: float = 1.0  # train.ema_beta: KL to the EMA policy
    ema_decay: float = 0.3  # train.kl_ema_decay
    ema_decay_ramp: float = 0.001  # linear: decay = min(ema_decay, ramp * steps); 0: constant ema_decay

    def validate(self) -> None:
        need(self.sampling_steps >= 2, f"awm.sampling_steps: must be >= 2, got {self.sampling_steps}")
        need(self.group_size >= 2, f"awm.group_size: must be >= 2 (advantages are relative within a group), got "
             f"{self.group_size}")
        need(self.sampler != "sde" or self.eta > 0, f"awm.eta: must be > 0 with awm.sampler=sde, got {self.eta}")
        need(not (self.sampler == "ode" and self.same_initial_noise),
             "awm.same_initial_noise with awm.sampler=ode makes every sample of a group identical; use "
             "awm.sampler=sde or awm.same_initial_noise=false")
        need(0 < self.timestep_fraction <= 1, f"awm.timestep_fraction: must be in (0, 1], got "
             f"{self.timestep_fraction}")
        top = int(self.sampling_steps * self.timestep_fraction)
        low = 1 if self.time_type == "discrete_wo_init" else 0
        need(1 <= self.train_timesteps <= top - low,
             f"awm.train_timesteps: must be in [1, {top - low}] (step indices {low}..{top - 1} of "
             f"awm.sampling_steps * awm.timestep_fraction), got {self.train_timesteps}")
        need(self.ghuber_power > 0, f"awm.ghuber_power: must be > 0, got {self.ghuber_power}")
        need(self.adv_clip_max > 0 and self.advantage_max > 0,
             f"awm.adv_clip_max and awm.advantage_max: must be > 0, got {self.adv_clip_max}, {self.advantage_max}")
        need(self.advantage_eps > 0, f"awm.advantage_eps: must be > 0, got {self.advantage_eps}")
        need(self.beta >= 0 and self.ema_beta >= 0, f"awm.beta and awm.ema_beta: must be >= 0, got {self.beta}, "
             f"{self.ema_beta}")
        need(0 <= self.ema_decay < 1, f"awm.ema_decay: must be in [0, 1), got {self.ema_decay}")
        need(self.ema_decay_ramp >= 0, f"awm.ema_decay_ramp: must be >= 0 (0: constant), got {self.ema_decay_ramp}")


# --------------------------------------------------------------------------------------------- pure functions
def timestep_indices(train_timesteps: int, sampling_steps: int, fraction: float, generator: torch.Generator,
                     skip_first: bool = False) -> torch.Tensor:
    """(train_timesteps,) step indices, one per stratum: boundaries ``linspace(lo, int(N * fraction), T + 1)``
    truncated to integers, index ``lower + floor(u * (upper - lower))`` with u ~ U[0, 1) (the AWM code's
    ``time_type='discrete'``, lo = 0; ``'discrete_wo_init'``, lo = 1)."""
    lo, hi = (1 if skip_first else 0), int(sampling_steps * fraction)
    bounds = torch.linspace(lo, hi, train_timesteps + 1)
    lower, upper = bounds[:-1].long(), bounds[1:].long()
    u = torch.rand(train_timesteps, generator=generator)
    return lower + (u * (upper - lower)).long()


def weighted_error(mse: torch.Tensor, sigma: torch.Tensor, weighting: str, power: float = 0.25) -> torch.Tensor:
    """AWM's ``-log p`` of a sample from its velocity error: ``uniform`` mse, ``t`` sigma * mse, ``ghuber``
    ``((mse + 1e-10)^p - 1e-10^p) * sigma / p`` (a generalised Huber loss: concave in mse, so large errors weigh
    less). Computed in float64 as the code does; (B,)."""
    mse, sigma = mse.double(), sigma.double()
    if weighting == "uniform":
        return mse
    if weighting == "t":
        return mse * sigma
    if weighting == "ghuber":
        tiny = torch.tensor(1e-10, dtype=torch.float64, device=mse.device)
        return (torch.pow(mse + tiny, power) - torch.pow(tiny, power)) * sigma / power
    raise ValueError(f"unknown weighting {weighting!r}; choose ghuber, uniform or t")


def awm_advantages(rewards: torch.Tensor, group_size: int, eps: float, global_std: bool, clip: float,
                   advantage_max: float) -> torch.Tensor:
    """Per-prompt advantages (:func:`directalign.methods.matching.per_prompt_advantages`) clipped to ``+-clip`` and
    scaled by ``advantage_max / clip``."""
    adv = per_prompt_advantages(rewards, group_size, eps, global_std).clamp(-clip, clip)
    return adv * (advantage_max / clip)


def ema_decay_at(steps_done: int, decay: float, ramp: float) -> float:
    """The KL-EMA's decay after ``steps_done`` optimizer steps: ``min(decay, ramp * steps_done)`` (linear) or
    ``decay`` (ramp = 0)."""
    return decay if ramp == 0 else min(decay, ramp * steps_done)


# --------------------------------------------------------------------------------------------- the recipe
class AWM:
    """The AWM recipe; ``cfg`` is a :class:`directalign.config.Config` with an ``awm`` section."""

    def __init__(self, cfg, adapter, reward):
        self.cfg, self.adapter, self.reward = cfg, adapter, reward
        a = cfg.awm
        self.sigmas = schedule(a.sampling_steps, cfg.sampling.shift)
        self.score = RewardScorer(cfg, reward)
        self.base = BaseReference(adapter, full=cfg.train.finetune == "full") if a.beta > 0 else None
        self.ema = WeightSnapshot("kl_ema")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.load_state_dict(state, self.adapter.transformer)

    def update_ema(self, step: int) -> float:
        """Before step ``step``: the EMA policy after ``step`` optimizer steps (the initial weights at step 0)."""
        a, transformer = self.cfg.awm, self.adapter.transformer
        if a.ema_beta == 0:
            return 0.0
        decay = ema_decay_at(step, a.ema_decay, a.ema_decay_ramp)
        if not self.ema:
            self.ema.capture(transformer)
        elif step > 0:
            self.ema.lerp(transformer, decay)
        return decay

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """This rank's advantages; with ``global_std`` on several processes the std is over every rank's rewards
        (the code gathers them before its stat tracker)."""
        a = self.cfg.awm
        dist = torch.distributed
        if a.global_std and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(rewards) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, rewards.contiguous())
            adv = awm_advantages(torch.cat(parts), a.group_size, a.advantage_eps, True, a.adv_clip_max,
                                 a.advantage_max)
            n = rewards.shape[0]
            return adv[dist.get_rank() * n:(dist.get_rank() + 1) * n]
        return awm_advantages(rewards, a.group_size, a.advantage_eps, a.global_std, a.adv_clip_max, a.advantage_max)

    def train_step(self, ctx: StepContext, backward: Backward) -> StepOutput:
        a, m = self.cfg.awm, self.cfg.model
        decay = self.update_ema(ctx.step)
        prompts = [p for p in ctx.prompts for _ in range(a.group_size)]
        embeds = self.adapter.encode_prompts(prompts)
        generator = ctx.generator()
        noise = group_noise(self.adapter, step_noise(self.adapter, ctx, m.height, m.width), a.group_size,
                            a.same_initial_noise, m.height, m.width, generator)
        x0 = sample_group(self.adapter, embeds, noise, a.sampling_steps, self.cfg.sampling.shift, a.guidance,
                          m.height, m.width, a.sampler, a.eta, generator).float()
        with torch.no_grad():
            images = self.adapter.decode(x0.to(self.adapter.dtype), m.height, m.width)
            rewards = self.score(images, prompts, ctx.step, ctx.python_rng()).float()
        adv = self.advantages(rewards).to(x0.device)
        velocity = train_velocity(self.adapter, embeds, a.train_guidance, m.height, m.width)
        gen = ctx.generator(STREAM_DRAWS)
        idx = timestep_indices(a.train_timesteps, a.sampling_steps, a.timestep_fraction, gen,
                               a.time_type == "discrete_wo_init")
        t_count, total, sums = len(idx), 0.0, {"mse": 0.0, "kl": 0.0, "ema_kl": 0.0}
        for i in idx.tolist():
            sig = torch.full((x0.shape[0],), float(self.sigmas[i]), device=x0.device)
            eps = randn_like(x0, gen)
            x_t = flow.interpolate(x0, eps, sig)
            with torch.no_grad():  # the references first: the EMA swaps weights in place
                v_base = self._under(self.base.active(), velocity, x_t, sig) if self.base is not None else None
                v_ema = self._under(self.ema.swapped(self.adapter.transformer), velocity, x_t, sig) \
                    if a.ema_beta > 0 else None
            v = velocity(x_t, sig)
            mse = flow_matching_mse(v, x0, eps)
            loss = (adv.double() * weighted_error(mse, sig, a.weighting, a.ghuber_power)).mean().float()
            if v_base is not None:
                kl = ((v - v_base) ** 2).mean()
                loss = loss + a.beta * kl
                sums["kl"] += float(kl.detach()) / t_count
            if v_ema is not None:
                ema_kl = ((v - v_ema) ** 2).mean()
                loss = loss + a.ema_beta * ema_kl
                sums["ema_kl"] += float(ema_kl.detach()) / t_count
            loss = loss / t_count
            backward(loss)
            total += float(loss.detach())
            sums["mse"] += float(mse.detach().mean()) / t_count
        metrics = {"awm_advantage_std": float(adv.std(unbiased=False)), "awm_advantage_abs_mean":
                   float(adv.abs().mean()), "awm_mse": sums["mse"], "awm_kl": sums["kl"], "awm_ema_kl":
                   sums["ema_kl"], "awm_ema_decay": decay, "awm_sigma": float(self.sigmas[idx].mean()),
                   "awm_zero_std_fraction": zero_std_fraction(rewards, a.group_size)}
        return StepOutput(loss=total, reward=float(rewards.mean()), metrics=metrics)

    @staticmethod
    def _under(context, velocity, x_t, sig) -> torch.Tensor:
        with context:
            return velocity(x_t, sig)

    def nfe(self, batch: int) -> dict[str, float]:
        """Per step: ``sampling_steps`` calls per sample (``batch * group_size`` samples) without gradient, plus
        the base and EMA references' calls per trained timestep; ``train_timesteps`` calls per sample with
        gradient (each doubled when the guidance runs CFG)."""
        a = self.cfg.awm
        samples = batch * a.group_size
        two = not self.adapter.has_guidance_embedding
        cfg_r = 2 if a.guidance > 1 and two else 1
        cfg_t = 2 if a.train_guidance > 1 and two else 1
        refs = int(a.beta > 0) + int(a.ema_beta > 0)
        grad = a.train_timesteps * samples * cfg_t
        return {"nfe_no_grad": a.sampling_steps * samples * cfg_r + refs * grad, "nfe_grad": grad}


SPEC = MethodSpec("awm", "awm", AWMConfig, AWM,
                  "Advantage Weighted Matching: advantage-weighted flow-matching loss on the policy's own samples")

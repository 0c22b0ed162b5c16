"""DanceGRPO / Flow-GRPO: group-relative policy optimisation of a rectified-flow model through SDE sampling.

Sources: Flow-GRPO (Liu et al. 2025, arXiv 2505.05470; code ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``)
and DanceGRPO (Xue et al. 2025, arXiv 2505.07818; code ``fastvideo/train_grpo_flux.py``, ``flux_step`` and
``train_one_step``).

The SDE (diffusers convention, sigma = 1 noise, ``x_s = s * eps + (1 - s) * x0``, velocity ``v = eps - x0``).
From the model's velocity at ``(x, s)`` the score of the marginal is ``grad log p_s(x) = -(x + (1 - s) v) / s``
(``x + (1 - s) v`` is the predicted noise). The reverse-time SDE with the same marginals as the ODE, for any
diffusion coefficient g(s), discretised by Euler-Maruyama from s to s' < s (``ds = s' - s < 0``):

    x' = mean + std * z,   mean = x + ds * (v - g(s)^2 / 2 * score),   std = g(s) * sqrt(-ds),   z ~ N(0, I)

i.e. ``mean = x + ds * (v + g^2 / (2 s) * (x + (1 - s) v))``. Two choices of g (``grpo.sde``):

* ``dance``: ``g = eta`` (DanceGRPO's ``flux_step`` with ``sde_solver``: ``std_dev_t = eta * sqrt(delta_t)``,
  ``prev_sample_mean += -0.5 * eta**2 * score * dsigma``);
* ``flow``: ``g = eta * sqrt(s / (1 - s))`` with ``s = 1`` replaced by ``sigma_1`` (Flow-GRPO's
  ``std_dev_t = sqrt(sigma / (1 - sigma)) * noise_level``; its ``prev_sample_mean = sample * (1 + std^2 dt / (2
  sigma)) + v * (1 + std^2 (1 - sigma) / (2 sigma)) dt`` is the same mean).

The log-probability of a transition is the Gaussian log-density, in fp32, averaged over every non-batch element
(both codes average, not sum): ``log p = mean(-(x' - mean)^2 / (2 std^2) - log std - log sqrt(2 pi))``.

One optimizer step:

1. each prompt of the batch is repeated ``G = group_size`` times (initial noise shared within a group when
   ``same_initial_noise``, as DanceGRPO's ``--init_same_noise``); the first N - 1 transitions are sampled with the
   SDE, recording states and log-probs without gradient; the last step is the deterministic x0 prediction
   ``x - sigma_{N-1} v`` (DanceGRPO decodes this prediction and never trains the last transition);
2. decode and score under ``torch.no_grad`` (so any reward works, differentiable or not);
3. advantages ``A = (r - mean_group) / (std_group + eps)`` (unbiased std, as DanceGRPO), clipped to
   ``[-adv_clip_max, adv_clip_max]``;
4. per sample a random permutation of the N - 1 transitions; the first ``int((N - 1) * timestep_fraction)`` are
   trained: the transition's log-prob is recomputed with gradient, ``ratio = exp(log p_new - log p_old)``, loss
   ``mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))``, plus ``kl_beta * KL`` to the reference model, each
   timestep's share backwarded on its own.

One rollout feeds exactly one optimizer step here (the engine's step), so the ratio is 1 up to float rounding and
the clip never binds; DanceGRPO makes several optimizer steps per rollout (gradient accumulation 4 over 12
samples), where it does. ``KL`` is the exact KL of the two Gaussian transitions (same std), per element averaged:
``mean((mean - mean_ref)^2) / (2 std^2)``; Flow-GRPO's ``kl_loss`` divides by ``2 std_dev_t^2`` without the
``|dt|`` factor of the transition variance, so its beta values are on another scale. The reference is the base
model: the transformer with its LoRA adapters disabled, or (full fine-tuning) a frozen copy made before training.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from dataclasses import dataclass

import torch

from ..engine.config import choice, need
from ..engine.context import StepContext, StepOutput
from .base import Backward, BranchResult, MethodSpec, step_output
from .common import RewardScorer, schedule, step_noise, velocity_fn

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class GRPOConfig:
    """DanceGRPO / Flow-GRPO: SDE rollouts with per-step Gaussian log-probabilities (fp32), groups of
    ``group_size`` samples per prompt, group-normalised advantages, PPO-clipped ratio loss on a random
    ``timestep_fraction`` of the SDE steps, optional KL to the reference (base) model."""

    sde: str = choice("dance", "flow")  # dance: diffusion g = eta (DanceGRPO flux_step) | flow: g = eta*sqrt(s/(1-s)) (Flow-GRPO)
    sampling_steps: int = 16  # DanceGRPO FLUX script
    guidance: float = 3.5  # DanceGRPO hard-codes guidance 3.5 in its FLUX sampler
    eta: float = 0.3  # DanceGRPO --eta 0.3 (Flow-GRPO noise_level 0.7 default, 0.9 in its FLUX PickScore config)
    group_size: int = 12  # DanceGRPO --num_generations 12
    same_initial_noise: bool = True  # DanceGRPO --init_same_noise; Flow-GRPO same_latent=False
    timestep_fraction: float = 0.6  # DanceGRPO --timestep_fraction 0.6
    clip_range: float = 1.0e-4  # both codes
    adv_clip_max: float = 5.0  # both codes
    advantage_eps: float = 1.0e-8  # DanceGRPO (Flow-GRPO's stat tracker: 1e-4)
    kl_beta: float = 0.0  # DanceGRPO: no KL; Flow-GRPO FLUX PickScore: beta 0 (SD3.5 configs 0.01-0.04)
    micro_batch: int = 0  # samples per differentiable forward (0: the whole batch); gradient accumulation

    def validate(self) -> None:
        need(self.sampling_steps >= 2, f"grpo.sampling_steps: must be >= 2 (the last step is deterministic), got "
             f"{self.sampling_steps}")
        need(self.eta > 0, f"grpo.eta: must be > 0 (the SDE needs noise for a log-probability), got {self.eta}")
        need(self.group_size >= 2, f"grpo.group_size: must be >= 2 (advantages are relative within a group), got "
             f"{self.group_size}")
        need(0 < self.timestep_fraction <= 1, f"grpo.timestep_fraction: must be in (0, 1], got {self.timestep_fraction}")
        need(self.clip_range >= 0, f"grpo.clip_range: must be >= 0, got {self.clip_range}")
        need(self.adv_clip_max > 0, f"grpo.adv_clip_max: must be > 0, got {self.adv_clip_max}")
        need(self.advantage_eps > 0, f"grpo.advantage_eps: must be > 0, got {self.advantage_eps}")
        need(self.kl_beta >= 0, f"grpo.kl_beta: must be >= 0, got {self.kl_beta}")
        need(self.micro_batch >= 0, f"grpo.micro_batch: must be >= 0 (0: whole batch), got {self.micro_batch}")



# --------------------------------------------------------------------------------------------- pure functions
def _expand(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    return t if t.ndim == 0 else t.reshape(-1, *([1] * (like.ndim - 1)))


def diffusion_coefficient(sigma: torch.Tensor | float, eta: float, kind: str, sigma_max: float = 1.0
                          ) -> torch.Tensor:
    """g(s): ``eta`` (dance) or ``eta * sqrt(s / (1 - s))`` with s = 1 replaced by ``sigma_max`` (flow)."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    if kind == "dance":
        return torch.full_like(s, float(eta))
    if kind == "flow":
        denom = 1 - torch.where(s >= 1, torch.full_like(s, float(sigma_max)), s)
        return eta * torch.sqrt(s / denom)
    raise ValueError(f"unknown SDE {kind!r}; choose dance or flow")


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float,
             eta: float, kind: str, sigma_max: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Euler-Maruyama transition from ``sigma`` to ``sigma_next`` (module docstring), in fp32.

    ``x``, ``v``: (B, ...); sigmas: floats or (B,). Returns ``mean`` (B, ...) and ``std`` broadcastable to it.
    """
    x, v = x.float(), v.float()
    s, sn = _expand(sigma, x), _expand(sigma_next, x)
    g = _expand(diffusion_coefficient(sigma, eta, kind, sigma_max), x)
    ds = sn - s
    score = -(x + (1 - s) * v) / s
    mean = x + ds * (v - 0.5 * g**2 * score)
    std = g * torch.sqrt(-ds)
    return mean, std


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(sample; mean, std^2 I) averaged over the non-batch elements (B,), in fp32."""
    sample, mean = sample.detach().float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    lp = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per element, averaged over the non-batch elements (B,)."""
    kl = (mean.float() - mean_ref.float()) ** 2 / (2 * torch.as_tensor(std, dtype=torch.float32) ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` within consecutive groups of ``group_size`` (unbiased std), shape of rewards."""
    r = rewards.float().reshape(-1, group_size)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(rewards.shape)


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: ``mean(max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps)))``; returns the loss
    and the ratios (B,)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


@dataclass
class Rollout:
    """One batch of SDE trajectories: ``states`` (N, S, ...) fp32 with ``states[i]`` the latent before transition
    i (``states[N-1]`` the last SDE state), ``log_probs`` (N-1, S), the final latents and their rewards (S,)."""

    states: torch.Tensor
    log_probs: torch.Tensor
    x0: torch.Tensor
    rewards: torch.Tensor


# --------------------------------------------------------------------------------------------- the recipe
class GRPO:
    """The DanceGRPO / Flow-GRPO recipe; ``cfg`` is a :class:`directalign.config.Config`."""

    def __init__(self, cfg, adapter, reward):
        self.cfg, self.adapter, self.reward = cfg, adapter, reward
        g = cfg.grpo
        self.sigmas = schedule(g.sampling_steps, cfg.sampling.shift)
        self.score = RewardScorer(cfg, reward)
        self._reference = None
        if g.kl_beta > 0 and cfg.train.finetune == "full":
            # the engine builds the method before fine-tuning starts or a checkpoint is loaded: these are the base
            # weights (a second copy of the transformer in memory)
            self._reference = copy.deepcopy(adapter.transformer).requires_grad_(False).eval()

    # ------------------------------------------------------------------------------------------ pieces
    @contextlib.contextmanager
    def reference_model(self):
        """Within the block the adapter's transformer is the base model (LoRA off, or the frozen copy)."""
        if self._reference is not None:
            pipe = self.adapter.pipe
            trained = pipe.transformer
            pipe.transformer = self._reference
            try:
                yield
            finally:
                pipe.transformer = trained
        else:
            self.adapter.transformer.disable_adapters()
            try:
                yield
            finally:
                self.adapter.transformer.enable_adapters()

    def _velocity(self, embeds):
        g, m = self.cfg.grpo, self.cfg.model
        inner = velocity_fn(self.adapter, embeds, g.guidance, m.height, m.width)
        dtype = self.adapter.dtype

        def velocity(x, sigma):  # states are fp32; the model sees its own dtype
            return inner(x.to(dtype), torch.as_tensor(sigma, device=x.device).to(dtype))

        return velocity

    def initial_noise(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B * G, ...) prompt-major: sample j of prompt p is row p * G + j. Sample 0 of each group uses the
        engine's noise; the others repeat it (``same_initial_noise``) or draw their own from ``generator``."""
        g, m = self.cfg.grpo, self.cfg.model
        rows = noise.repeat_interleave(g.group_size, dim=0)
        if not g.same_initial_noise:
            b = noise.shape[0]
            extra = self.adapter.noise(b * (g.group_size - 1), m.height, m.width, generator).to(noise)
            extra = extra.reshape(b, g.group_size - 1, *noise.shape[1:])
            rows = torch.cat([noise[:, None], extra], dim=1).reshape(rows.shape)
        return rows

    @torch.no_grad()
    def rollout(self, embeds, x: torch.Tensor, prompts: list[str], step: int, generator: torch.Generator,
                rng: random.Random) -> Rollout:
        g, m = self.cfg.grpo, self.cfg.model
        velocity = self._velocity(embeds)
        sig = self.sigmas
        n = g.sampling_steps
        x = x.float()
        states, log_probs = [x], []
        for i in range(n - 1):
            s = torch.full((x.shape[0],), float(sig[i]))
            mean, std = sde_step(x, velocity(x, s), float(sig[i]), float(sig[i + 1]), g.eta, g.sde,
                                 float(sig[1]))
            z = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
            x = mean + std * z
            log_probs.append(gaussian_log_prob(x, mean, std))
            states.append(x)
        s_last = float(sig[n - 1])
        x0 = x - s_last * velocity(x, torch.full((x.shape[0],), s_last)).float()  # deterministic last step
        images = self.adapter.decode(x0.to(self.adapter.dtype), m.height, m.width)
        rewards = self.score(images, prompts, step, rng).float()
        return Rollout(torch.stack(states), torch.stack(log_probs), x0, rewards)

    def train_timesteps(self, samples: int, generator: torch.Generator) -> torch.Tensor:
        """(samples, n_train): per sample the first ``int((N - 1) * timestep_fraction)`` (>= 1) entries of a random
        permutation of the N - 1 SDE transitions (DanceGRPO's per-sample ``randperm``)."""
        g = self.cfg.grpo
        t = g.sampling_steps - 1
        n_train = max(1, int(t * g.timestep_fraction))
        return torch.stack([torch.randperm(t, generator=generator)[:n_train] for _ in range(samples)])

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self, ctx: StepContext, backward: Backward) -> StepOutput:
        step, prompts, generator, rng = ctx.step, list(ctx.prompts), ctx.generator(), ctx.python_rng()
        noise = step_noise(self.adapter, ctx, self.cfg.model.height, self.cfg.model.width)
        g = self.cfg.grpo
        group_prompts = [p for p in prompts for _ in range(g.group_size)]
        embeds = self.adapter.encode_prompts(group_prompts)
        ro = self.rollout(embeds, self.initial_noise(noise, generator), group_prompts, step, generator, rng)
        adv = group_advantages(ro.rewards, g.group_size, g.advantage_eps).clamp(-g.adv_clip_max, g.adv_clip_max)
        adv = adv.to(ro.states.device)

        n_samples = len(group_prompts)
        chosen = self.train_timesteps(n_samples, generator).to(ro.states.device)  # (S, n_train)
        n_train = chosen.shape[1]
        rows = torch.arange(n_samples, device=ro.states.device)
        sig = self.sigmas.to(ro.states.device)
        chunk = g.micro_batch or n_samples
        velocity = self._velocity(embeds)
        total, kl_total, max_dev, clipped, ratios_seen = 0.0, 0.0, 0.0, 0, 0
        for j in range(n_train):
            idx = chosen[:, j]
            for start in range(0, n_samples, chunk):
                c = slice(start, min(start + chunk, n_samples))
                ic, rc = idx[c], rows[c]
                x_t, x_next = ro.states[ic, rc], ro.states[ic + 1, rc]
                s, s_next = sig[ic].float(), sig[ic + 1].float()
                vel_c = self._velocity(embeds[c]) if chunk < n_samples else velocity
                mean, std = sde_step(x_t, vel_c(x_t, s), s, s_next, g.eta, g.sde, float(sig[1]))
                new_lp = gaussian_log_prob(x_next, mean, std)
                loss, ratio = clipped_policy_loss(new_lp, ro.log_probs[ic, rc], adv[c], g.clip_range)
                if g.kl_beta > 0:
                    with torch.no_grad(), self.reference_model():
                        mean_ref, _ = sde_step(x_t, vel_c(x_t, s), s, s_next, g.eta, g.sde, float(sig[1]))
                    kl = gaussian_kl(mean, mean_ref, std).mean()
                    loss = loss + g.kl_beta * kl
                    kl_total += float(kl.detach()) * (c.stop - c.start) / n_samples / n_train
                loss = loss * (c.stop - c.start) / n_samples / n_train
                backward(loss)
                total += float(loss.detach())
                deviation = (ratio.detach() - 1).abs()
                max_dev = max(max_dev, float(deviation.max()))
                clipped += int((deviation > g.clip_range).sum())
                ratios_seen += deviation.numel()
        trained_sigma = float(sig[chosen].mean())
        # diagnostics: max |ratio - 1| (0 up to rounding on-policy), the share of ratios outside the clip range,
        # the KL to the reference and the share of groups whose rewards were all equal (no signal)
        extra = {"max_ratio_deviation": max_dev, "clip_fraction": clipped / max(1, ratios_seen), "kl": kl_total,
                 "zero_std_fraction": float((ro.rewards.reshape(-1, g.group_size).std(dim=1) == 0).float().mean())}
        return step_output([BranchResult("grpo", total, float(ro.rewards.mean()), trained_sigma, extra=extra)])

    def nfe(self, batch: int) -> dict[str, float]:
        """Per step: N rollout calls per sample (N - 1 SDE steps and the final prediction) without gradient, plus
        the reference model's calls when ``kl_beta > 0``; ``int((N - 1) * timestep_fraction)`` calls per sample
        with gradient."""
        g = self.cfg.grpo
        samples = batch * g.group_size
        n_train = max(1, int((g.sampling_steps - 1) * g.timestep_fraction))
        no_grad = g.sampling_steps + (n_train if g.kl_beta > 0 else 0)
        return {"nfe_no_grad": no_grad * samples, "nfe_grad": n_train * samples}


SPEC = MethodSpec("grpo", "grpo", GRPOConfig, GRPO,
                  "DanceGRPO / Flow-GRPO: SDE sampling, group advantages, clipped ratio, optional KL")

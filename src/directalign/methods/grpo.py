"""DanceGRPO / Flow-GRPO / Flow-GRPO-Fast: group-relative policy optimisation of a rectified-flow model through SDE
sampling. The math is in :mod:`directalign.methods.grpo_math`, the settings in :mod:`directalign.methods.grpo_config`;
this module holds the recipe.

Sources: Flow-GRPO (Liu et al. 2025, arXiv 2505.05470; yifan123/flow_grpo@ac4c86e ``scripts/train_sd3.py``,
``config/base.py``, ``config/grpo.py``, ``flow_grpo/stat_tracking.py``,
``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``), its Fast variant (zhtmike/flow_grpo@3d02fd9, a fork carrying
the later upstream code: ``scripts/train_sd3_fast.py``, ``flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_fast.py``)
and DanceGRPO (Xue et al. 2025, arXiv 2505.07818; XueZeyue/DanceGRPO ``fastvideo/train_grpo_flux.py``).

One rollout (every ``updates_per_rollout`` engine steps):

1. each prompt of the batch is repeated ``G = group_size`` times (one initial noise per group with
   ``same_initial_noise``); the first N - 1 transitions are sampled with the SDE (``grpo.sde``, noise level ``eta``),
   recording states and fp32 log-probs without gradient; the last step is the deterministic x0 prediction
   ``x - sigma_{N-1} v`` (flow_grpo's later pipelines make it deterministic too, ``sde_window = (0, N - 1)``, and
   leave it out of training: its Gaussian is too sharp). Fast (``sde_window_size > 0``): only the transitions
   ``[start, start + size)`` are SDE steps, ``start`` uniform on ``sde_window_range``, every other one an Euler step;
2. decode and score without gradient (any reward works);
3. advantages (``grpo.advantage``): ``group``: ``(r - mean) / (unbiased std + eps)`` per group (DanceGRPO);
   ``per_prompt`` / ``global_std``: flow_grpo's per-prompt stat tracker (population std of the prompt's rewards or
   of the whole batch, ``+ eps``); then clipped to ``+-adv_clip_max``;
4. with ``drop_zero_advantage`` the samples whose advantage is exactly 0 (groups whose rewards all agree) are
   dropped, topped up to a multiple of ``updates_per_rollout`` as flow_grpo does; the rest are shuffled and split
   into ``updates_per_rollout`` parts, one per optimizer step. The trained transitions per sample: the first
   ``int((N - 1) * timestep_fraction)`` of a random permutation (Fast: the window's transitions).

One optimizer step (engine step ``t``, part ``t mod updates_per_rollout`` of the current rollout): for every trained
transition and micro-batch, the log-prob is recomputed with gradient under the current policy, ``ratio = exp(log p -
log p_old)``, loss ``mean(max(-A ratio, -A clip(ratio, 1 +- clip_range)))`` plus ``kl_beta`` times the KL to the
reference (``kl_form``), and each share is backwarded on its own, so gradients accumulate over all transitions and
samples of the part. From the second part of a rollout on, the policy has taken optimizer steps since the rollout:
the ratio departs from 1 and the clip binds (flow_grpo: ``gradient_accumulation_steps = num_batches_per_epoch / 2``,
two optimizer steps per epoch). The rollout waiting for its later parts is the method's state across engine steps:
``state_dict`` / ``load_state_dict`` put it into checkpoints (``method.safetensors``), so a resume between two parts
replays exactly (on one process; with several processes only rank 0's state is saved, so a resume there samples a
new rollout).

Where we differ on purpose: the prompts of the engine steps that reuse a rollout are not sampled (flow_grpo's epoch
draws ``48`` prompts and splits their samples; here a rollout has ``train.batch_size`` prompts per process and the
sampler simply moves on);
flow_grpo@ac4c86e trains the first ``int(N * fraction)`` steps in order and detaches the unconditional CFG branch,
here a random subset (all of them at fraction 1) and gradient through both branches (as its Fast script does).
``cfg_in_training: false`` samples and trains without CFG (guidance 1, flow_grpo's "No-CFG" SD3 training); a
guidance-distilled model (FLUX.1-dev) keeps its guidance input either way. The reference for the KL is the base
model: the transformer with its LoRA adapters disabled, or (full fine-tuning) a frozen copy made before training.

Diagnostics (``grpo_*`` in metrics.jsonl): ``max_ratio_deviation``, ``clip_fraction`` (share of ratios outside
``1 +- clip_range``), ``approx_kl`` (``0.5 mean((log p - log p_old)^2)``), ``kl``, ``zero_std_fraction``
(flow_grpo's ``zero_std_ratio``), ``dropped_fraction``, ``ratio_mean_high`` / ``_mid`` / ``_low`` (the mean ratio of
the trained transitions in each third of the schedule, high noise first; 1 where a third had none this step) and
``rollout_part`` (0 on a fresh rollout).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .. import flow
from ..engine.context import StepContext, StepOutput
from .base import Backward, BranchResult, MethodSpec, step_output
from .common import RewardScorer, decode_texts, encode_texts, schedule, step_noise, velocity_fn
from .grpo_config import GRPOConfig, GRPOFastConfig
from .grpo_math import (  # noqa: F401
    LOG_SQRT_2PI,
    all_ranks_std,
    approx_kl,
    clipped_policy_loss,
    diffusion_coefficient,
    draw_sde_window,
    gaussian_kl,
    gaussian_log_prob,
    group_advantages,
    keep_nonzero,
    noise_bucket,
    ode_step,
    prompt_advantages,
    sde_step,
    split_rollout,
    transition_kl,
    zero_std_fraction,
)
from .matching import BaseReference

BUCKETS = ("high", "mid", "low")


@dataclass
class Rollout:
    """One batch of trajectories: ``states`` (N, S, ...) fp32 with ``states[i]`` the latent before transition i,
    ``log_probs`` (N-1, S) (0 on deterministic transitions), the final latents and their rewards (S,)."""

    states: torch.Tensor
    log_probs: torch.Tensor
    x0: torch.Tensor
    rewards: torch.Tensor


# --------------------------------------------------------------------------------------------- the recipe
class GRPO:
    """The DanceGRPO / Flow-GRPO (-Fast) recipe; ``cfg`` is a :class:`directalign.config.Config`."""

    def __init__(self, cfg, adapter, reward):
        self.cfg, self.adapter, self.reward = cfg, adapter, reward
        self.g = g = cfg.method_section
        self.sigmas = (flow.diffusers_sigma_schedule(g.sampling_steps, cfg.sampling.shift) if g.schedule == "diffusers"
                       else schedule(g.sampling_steps, cfg.sampling.shift))
        self.score = RewardScorer(cfg, reward)
        self._buffer: dict | None = None  # the rollout whose later parts are still to train
        # the engine builds the method before fine-tuning starts or a checkpoint is loaded: a full fine-tuning's copy
        # holds the base weights (a second transformer in memory, made only when the KL needs it)
        self._base = BaseReference(adapter, full=g.kl_beta > 0 and cfg.train.finetune == "full")

    # ------------------------------------------------------------------------------------------ pieces
    def reference_model(self):
        """Within the block the adapter's transformer is the base model (LoRA off, or the frozen copy)."""
        return self._base.active()

    @property
    def guidance(self) -> float | None:
        g = self.g
        if g.cfg_in_training or getattr(self.adapter, "has_guidance_embedding", False):
            return g.guidance
        return 1.0

    def _velocity(self, embeds):
        m = self.cfg.model
        inner = velocity_fn(self.adapter, embeds, self.guidance, m.height, m.width)
        dtype = self.adapter.dtype

        def velocity(x, sigma):  # states are fp32; the model sees its own dtype
            return inner(x.to(dtype), torch.as_tensor(sigma, device=x.device).to(dtype))

        return velocity

    def initial_noise(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B * G, ...) prompt-major: sample j of prompt p is row p * G + j. Sample 0 of each group uses the
        engine's noise; the others repeat it (``same_initial_noise``) or draw their own from ``generator``."""
        g, m = self.g, self.cfg.model
        rows = noise.repeat_interleave(g.group_size, dim=0)
        if not g.same_initial_noise:
            b = noise.shape[0]
            extra = self.adapter.noise(b * (g.group_size - 1), m.height, m.width, generator).to(noise)
            extra = extra.reshape(b, g.group_size - 1, *noise.shape[1:])
            rows = torch.cat([noise[:, None], extra], dim=1).reshape(rows.shape)
        return rows

    @torch.no_grad()
    def rollout(self, embeds, x: torch.Tensor, prompts: list[str], step: int, generator: torch.Generator,
                rng: random.Random, window: tuple[int, int] | None = None) -> Rollout:
        """SDE on the transitions in ``window`` (default: all N - 1), Euler elsewhere, then the x0 prediction."""
        g, m = self.g, self.cfg.model
        velocity = self._velocity(embeds)
        sig = self.sigmas
        n = g.sampling_steps
        lo, hi = window if window is not None else (0, n - 1)
        x = x.float()
        states, log_probs = [x], []
        for i in range(n - 1):
            s = torch.full((x.shape[0],), float(sig[i]))
            v = velocity(x, s)
            if lo <= i < hi:
                mean, std = sde_step(x, v, float(sig[i]), float(sig[i + 1]), g.eta, g.sde, float(sig[1]))
                z = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
                x = mean + std * z
                log_probs.append(gaussian_log_prob(x, mean, std))
            else:
                x = ode_step(x, v, float(sig[i]), float(sig[i + 1]))
                log_probs.append(torch.zeros(x.shape[0], device=x.device))
            states.append(x)
        s_last = float(sig[n - 1])
        x0 = x - s_last * velocity(x, torch.full((x.shape[0],), s_last)).float()  # deterministic last step
        images = self.adapter.decode(x0.to(self.adapter.dtype), m.height, m.width)
        rewards = self.score(images, prompts, step, rng).float()
        return Rollout(torch.stack(states), torch.stack(log_probs), x0, rewards)

    def n_train(self) -> int:
        g = self.g
        return g.sde_window_size or max(1, int((g.sampling_steps - 1) * g.timestep_fraction))

    def train_timesteps(self, samples: int, generator: torch.Generator,
                        window: tuple[int, int] | None = None) -> torch.Tensor:
        """(samples, n_train): the window's transitions (Fast), else per sample the first
        ``int((N - 1) * timestep_fraction)`` (>= 1) entries of a random permutation of the N - 1 SDE transitions
        (DanceGRPO's per-sample ``randperm``)."""
        if window is not None and self.g.sde_window_size:
            return torch.arange(*window).expand(samples, -1).clone()
        t = self.g.sampling_steps - 1
        return torch.stack([torch.randperm(t, generator=generator)[:self.n_train()] for _ in range(samples)])

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        g = self.g
        if g.advantage == "group":
            adv = group_advantages(rewards, g.group_size, g.advantage_eps)
        else:
            glob = g.advantage == "global_std"
            adv = prompt_advantages(rewards, prompts, glob, g.advantage_eps, all_ranks_std(rewards) if glob else None)
        return adv.clamp(-g.adv_clip_max, g.adv_clip_max)

    # ------------------------------------------------------------------------------------------ the rollout
    def _collect(self, ctx: StepContext, start: int) -> dict:
        g = self.g
        generator, rng = ctx.generator(), ctx.python_rng()
        noise = step_noise(self.adapter, ctx, self.cfg.model.height, self.cfg.model.width)
        prompts = [p for p in ctx.prompts for _ in range(g.group_size)]
        embeds = self.adapter.encode_prompts(prompts)
        window = draw_sde_window(g.sde_window_size, *g.window_range(), generator) if g.sde_window_size else None
        ro = self.rollout(embeds, self.initial_noise(noise, generator), prompts, ctx.step, generator, rng, window)
        adv = self.advantages(ro.rewards, prompts).to(ro.states.device)
        samples = len(prompts)
        chosen = self.train_timesteps(samples, generator, window).to(ro.states.device)  # (S, n_train)
        kept = (keep_nonzero(adv.cpu(), g.updates_per_rollout, generator) if g.drop_zero_advantage
                else torch.arange(samples))
        parts = split_rollout(kept, g.updates_per_rollout, generator)
        return {"start": start, "states": ro.states, "log_probs": ro.log_probs, "rewards": ro.rewards,
                "advantages": adv, "chosen": chosen, "order": torch.cat(parts),
                "sizes": torch.tensor([len(p) for p in parts]), "prompts": prompts,
                "zero_std": zero_std_fraction(ro.rewards, prompts), "dropped": 1 - len(kept) / samples}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rollout still to be trained (empty between rollouts), as tensors for ``method.safetensors``."""
        b = self._buffer
        if b is None:
            return {}
        out = {k: b[k] for k in ("states", "log_probs", "rewards", "advantages", "chosen", "order", "sizes")}
        out.update(start=torch.tensor(b["start"]), prompts=encode_texts(b["prompts"]),
                   scalars=torch.tensor([b["zero_std"], b["dropped"]], dtype=torch.float64),
                   world_size=torch.tensor(self._world_size))
        return {f"grpo_rollout.{k}": v for k, v in out.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        b = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("grpo_rollout.")}
        if not b or int(b["world_size"]) != 1:  # several processes: rank 0's rollout is not this rank's
            self._buffer = None
            return
        device = self.adapter.device
        self._buffer = {k: b[k].to(device) for k in ("states", "log_probs", "rewards", "advantages", "chosen")}
        zero_std, dropped = b["scalars"].tolist()
        self._buffer.update(start=int(b["start"]), order=b["order"], sizes=b["sizes"],
                            prompts=decode_texts(b["prompts"]), zero_std=zero_std, dropped=dropped)

    _world_size = 1

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self, ctx: StepContext, backward: Backward) -> StepOutput:
        g = self.g
        self._world_size = ctx.world_size
        k = g.updates_per_rollout
        part_index = ctx.step % k
        start = ctx.step - part_index
        if self._buffer is None or self._buffer["start"] != start:
            # a fresh rollout (or a resumed run whose checkpoint holds no rollout: its remaining parts, from here)
            self._buffer = self._collect(ctx, start)
        buf = self._buffer
        sizes = buf["sizes"].tolist()
        part = buf["order"][sum(sizes[:part_index]):sum(sizes[:part_index + 1])].to(buf["states"].device)
        result = self._train_part(buf, part, backward)
        result.extra.update(zero_std_fraction=buf["zero_std"], dropped_fraction=buf["dropped"],
                            rollout_part=float(part_index))
        if part_index == k - 1:
            self._buffer = None
        return step_output([result])

    def _train_part(self, buf: dict, part: torch.Tensor, backward: Backward) -> BranchResult:
        g = self.g
        states, old_lp, adv, chosen = buf["states"], buf["log_probs"], buf["advantages"], buf["chosen"]
        sig = self.sigmas.to(states.device)
        n_part = len(part)
        n_train = chosen.shape[1]
        transitions = g.sampling_steps - 1
        embeds = self.adapter.encode_prompts(buf["prompts"]) if n_part else None
        chunk = g.micro_batch or max(1, n_part)
        total = kl_total = akl_total = max_dev = 0.0
        clipped = seen = 0
        bucket_sum, bucket_n = torch.zeros(len(BUCKETS)), torch.zeros(len(BUCKETS))
        for j in range(n_train):
            for lo in range(0, n_part, chunk):
                rows = part[lo:lo + chunk]
                share = len(rows) / n_part / n_train
                idx = chosen[rows, j]
                x_t, x_next = states[idx, rows], states[idx + 1, rows]
                s, s_next = sig[idx].float(), sig[idx + 1].float()
                velocity = self._velocity(embeds[rows])
                mean, std = sde_step(x_t, velocity(x_t, s), s, s_next, g.eta, g.sde, float(sig[1]))
                new_lp = gaussian_log_prob(x_next, mean, std)
                loss, ratio = clipped_policy_loss(new_lp, old_lp[idx, rows], adv[rows], g.clip_range)
                if g.kl_beta > 0:
                    with torch.no_grad(), self.reference_model():
                        mean_ref, _ = sde_step(x_t, velocity(x_t, s), s, s_next, g.eta, g.sde, float(sig[1]))
                    kl = transition_kl(mean, mean_ref, std, s, s_next, g.kl_form).mean()
                    loss = loss + g.kl_beta * kl
                    kl_total += float(kl.detach()) * share
                loss = loss * share
                backward(loss)
                total += float(loss.detach())
                akl_total += float(approx_kl(new_lp, old_lp[idx, rows])) * share
                r = ratio.detach().cpu()
                deviation = (r - 1).abs()
                max_dev = max(max_dev, float(deviation.max()))
                clipped += int((deviation > g.clip_range).sum())
                seen += deviation.numel()
                b = noise_bucket(idx.cpu(), transitions, len(BUCKETS))
                bucket_sum.index_add_(0, b, r.float())
                bucket_n.index_add_(0, b, torch.ones_like(r))
        trained_sigma = float(sig[chosen[part]].mean()) if n_part else 0.0
        extra = {"max_ratio_deviation": max_dev, "clip_fraction": clipped / max(1, seen), "kl": kl_total,
                 "approx_kl": akl_total}
        for name, s_, n_ in zip(BUCKETS, bucket_sum.tolist(), bucket_n.tolist()):
            extra[f"ratio_mean_{name}"] = s_ / n_ if n_ else 1.0
        return BranchResult("grpo", total, float(buf["rewards"].mean()), trained_sigma, extra=extra)

    def nfe(self, batch: int) -> dict[str, float]:
        """Per engine step (a rollout every ``updates_per_rollout`` steps, so its calls are spread over them): N
        rollout calls per sample without gradient, plus the reference model's calls when ``kl_beta > 0``; n_train
        calls with gradient per trained sample (every sample, before zero-advantage drops)."""
        g = self.g
        samples = batch * g.group_size / g.updates_per_rollout
        n_train = self.n_train()
        no_grad = g.sampling_steps + (n_train if g.kl_beta > 0 else 0)
        return {"nfe_no_grad": no_grad * samples, "nfe_grad": n_train * samples}


SPEC = MethodSpec("grpo", "grpo", GRPOConfig, GRPO,
                  "DanceGRPO / Flow-GRPO: SDE sampling, group advantages, clipped ratio, optional KL")
FAST_SPEC = MethodSpec("grpo-fast", "grpo_fast", GRPOFastConfig, GRPO,
                       "Flow-GRPO-Fast: ODE rollouts branching into the SDE on a 1-2 step window, trained there")

"""Diffusion-DPO for flow matching (Wallace et al. 2023, arXiv 2311.12908), offline on preference pairs or online
on best-vs-worst pairs of the model's own samples, as flow_grpo does it (``yifan123/flow_grpo@ac4c86e``
``scripts/train_sd3_dpo.py``, ``config/dpo.py``, ``flow_grpo/stat_tracking.py``).

The loss of a pair (winner w, loser l) with one shared noise eps and one shared sigma (flow_grpo: "chosen and
rejected using same noise as in Diffusion-DPO"):

    mse_x   = mean((v_theta(x_s, s) - (eps - x))^2)     (the flow-matching velocity error, x_s = s eps + (1 - s) x)
    inside  = -beta / 2 * [(mse_w - mse_w,ref) - (mse_l - mse_l,ref)]
    loss    = -log sigmoid(inside)

``inside`` is the implicit reward margin: ``dpo_accuracy`` is the share of pairs with ``inside > 0`` (flow_grpo's
``implicit_acc``), ``dpo_margin`` its mean. Sigmas are logit-normal (mean 0, std 1) on the 1000-step training
schedule with the model's shift (:func:`directalign.methods.matching.logit_normal_train_sigmas`).

Pairs (``dpo.data``):

* ``offline``: pairs from a manifest or folder (:mod:`directalign.methods.pairs`), VAE-encoded each step;
* ``online``: each prompt is sampled ``group_size`` times (no gradient) and its best and worst samples by the
  reward form a pair (flow_grpo's ``type='dpo'`` stat tracker; a group of equal rewards gives samples 1 and 0).

The reference is the base model (LoRA adapters disabled, or a frozen copy for full fine-tuning) until the first
refresh; with ``ref_update_step = K > 0`` it becomes a frozen copy of the policy at every step ``t > 0`` with
``t % K == 0`` (flow_grpo's ``copy_learner_to_ref``: K = 10^7, never, in its DPO configs; "e.g. 40" for online
DPO). That copy is state across steps: it is saved in every checkpoint (``state_dict``) and restored on resume.

Where we match flow_grpo: the loss, beta, the sigma draw (tested against diffusers' scheduler), the pair selection,
rollouts with the reference (``sample_from: reference``) through the Flow-GRPO SDE (``sampler: sde``, noise level
0.7, independent initial noise per sample) and the refresh rule. Where we differ on purpose:

* one engine step = ``timestep_draws`` accumulated (sigma, eps) draws of one batch of pairs; flow_grpo accumulates
  ``int(num_steps * timestep_fraction)`` = 39 draws over ``gradient_accumulation_steps`` batches into one optimizer
  step (``sd35-dpo.yaml`` sets ``timestep_draws: 39``);
* options flow_grpo has not: ``sample_from: policy``, and ``sampler: ode`` (the Euler ODE, which needs independent
  noise per sample: with shared noise every sample of a group would be identical);
* flow_grpo's EMA of the trained adapter (for evaluation) is ``train.ema_decay`` here;
* offline mode computes no reward: its steps log ``reward`` 0 (the held-out evaluation still scores the model).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import flow
from ..engine.config import choice, need
from ..engine.context import PromptSampler, StepContext, StepOutput
from .base import Backward, MethodSpec
from .common import RewardScorer, randn_like, step_noise
from .matching import (
    BaseReference,
    WeightSnapshot,
    best_and_worst,
    flow_matching_mse,
    group_noise,
    logit_normal_train_sigmas,
    sample_group,
    train_velocity,
    zero_std_fraction,
)
from .pairs import load_pairs

log = logging.getLogger("directalign")
STREAM_DRAWS = 13  # the (sigma, eps) draws of the DPO loss: a seed stream of their own (engine/context.py streams)


@dataclass
class DPOConfig:
    """``dpo:``; defaults are flow_grpo's ``config/dpo.py`` (``pickscore_sd3``) where they transfer."""

    data: str = choice("online", "offline")  # online: best vs worst of a group | offline: pairs from offline_data
    offline_data: str = ""  # a pair manifest (.jsonl: prompt, winner, loser) or folder; offline only
    beta: float = 100.0  # flow_grpo train.beta
    timestep_draws: int = 1  # (t, eps) draws per step, each backwarded on its own (flow_grpo: 39 per rollout)
    logit_mean: float = 0.0  # flow_grpo logit_mean
    logit_std: float = 1.0  # flow_grpo logit_std
    timestep_levels: int = 1000  # sigmas on the N-step training schedule (scheduler num_train_timesteps); 0: continuous
    ref_update_step: int = 0  # refresh the reference to the policy every K steps; 0: the base model throughout
    train_guidance: float = 1.0  # the training forward's guidance (flow_grpo: none, a plain conditional pass)
    # online pairs
    group_size: int = 24  # flow_grpo sample.num_image_per_prompt
    sample_from: str = choice("reference", "policy")  # flow_grpo samples with its ref adapter
    sampler: str = choice("sde", "ode")  # sde: Flow-GRPO's SDE (flow_grpo) | ode: the Euler ODE
    sampling_steps: int = 40  # flow_grpo sample.num_steps
    guidance: float = 4.5  # flow_grpo sample.guidance_scale (rollouts)
    eta: float = 0.7  # flow_grpo sample.noise_level (sde only)
    same_initial_noise: bool = False  # flow_grpo: independent initial noise per sample

    def validate(self) -> None:
        need(self.beta > 0, f"dpo.beta: must be > 0, got {self.beta}")
        need(self.timestep_draws >= 1, f"dpo.timestep_draws: must be >= 1, got {self.timestep_draws}")
        need(self.logit_std > 0, f"dpo.logit_std: must be > 0, got {self.logit_std}")
        need(self.timestep_levels >= 0, f"dpo.timestep_levels: must be >= 0 (0: continuous), got "
             f"{self.timestep_levels}")
        need(self.ref_update_step >= 0, f"dpo.ref_update_step: must be >= 0 (0: never), got {self.ref_update_step}")
        need(self.data != "offline" or bool(self.offline_data),
             "dpo.data=offline needs dpo.offline_data (a pair manifest .jsonl or folder)")
        need(self.data != "online" or not self.offline_data,
             "dpo.offline_data is set but dpo.data=online ignores it; set dpo.data=offline or remove offline_data")
        need(self.group_size >= 2, f"dpo.group_size: must be >= 2 (a pair is the best and worst of a group), got "
             f"{self.group_size}")
        need(self.sampling_steps >= 2, f"dpo.sampling_steps: must be >= 2, got {self.sampling_steps}")
        need(self.sampler != "sde" or self.eta > 0, f"dpo.eta: must be > 0 with dpo.sampler=sde, got {self.eta}")
        need(not (self.sampler == "ode" and self.same_initial_noise),
             "dpo.same_initial_noise with dpo.sampler=ode makes every sample of a group identical; use "
             "dpo.sampler=sde or dpo.same_initial_noise=false")


# --------------------------------------------------------------------------------------------- pure functions
def dpo_loss(mse_w: torch.Tensor, mse_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO loss ``-log sigmoid(inside)`` and the implicit reward margin
    ``inside = -beta / 2 * ((mse_w - ref_w) - (mse_l - ref_l))`` (both (P,), fp32; module docstring)."""
    inside = -0.5 * beta * ((mse_w.float() - ref_w.float()) - (mse_l.float() - ref_l.float()))
    return -F.logsigmoid(inside), inside


# --------------------------------------------------------------------------------------------- the recipe
class DPO:
    """The Diffusion-DPO recipe (offline or online pairs); ``cfg`` is a :class:`directalign.config.Config`."""

    def __init__(self, cfg, adapter, reward):
        self.cfg, self.adapter, self.reward = cfg, adapter, reward
        d = cfg.dpo
        self.base = BaseReference(adapter, full=cfg.train.finetune == "full")
        self.snapshot = WeightSnapshot("reference")
        self.score = RewardScorer(cfg, reward)
        self.pairs = load_pairs(d.offline_data, cfg.model.height, cfg.model.width) if d.data == "offline" else None
        if self.pairs is not None:
            log.info("offline DPO: %d preference pairs from %s", len(self.pairs), d.offline_data)

    # ------------------------------------------------------------------------------------------ state across steps
    def reference(self):
        """Within the block the transformer is the reference: the last refreshed copy, or the base model."""
        if self.snapshot:
            return self.snapshot.swapped(self.adapter.transformer)
        return self.base.active()

    def refresh_due(self, step: int) -> bool:
        k = self.cfg.dpo.ref_update_step
        return k > 0 and step > 0 and step % k == 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.snapshot.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.snapshot.load_state_dict(state, self.adapter.transformer)

    # ------------------------------------------------------------------------------------------ pairs
    def offline_pairs(self, ctx: StepContext) -> tuple[list[str], torch.Tensor, torch.Tensor, dict]:
        sampler = PromptSampler(list(range(len(self.pairs))), ctx.batch_size, ctx.seed, True, ctx.rank,
                                ctx.world_size)
        idx = sampler.batch(ctx.step)
        x_w = self.adapter.encode_images(self.pairs.winners[idx])
        x_l = self.adapter.encode_images(self.pairs.losers[idx])
        return [self.pairs.prompts[i] for i in idx], x_w, x_l, {}

    def online_pairs(self, ctx: StepContext) -> tuple[list[str], torch.Tensor, torch.Tensor, dict]:
        d, m = self.cfg.dpo, self.cfg.model
        prompts = list(ctx.prompts)
        group_prompts = [p for p in prompts for _ in range(d.group_size)]
        embeds = self.adapter.encode_prompts(group_prompts)
        generator = ctx.generator()
        noise = group_noise(self.adapter, step_noise(self.adapter, ctx, m.height, m.width), d.group_size,
                            d.same_initial_noise, m.height, m.width, generator)
        context = self.reference() if d.sample_from == "reference" else contextlib.nullcontext()
        with context:
            x0 = sample_group(self.adapter, embeds, noise, d.sampling_steps, self.cfg.sampling.shift, d.guidance,
                              m.height, m.width, d.sampler, d.eta, generator)
        with torch.no_grad():
            images = self.adapter.decode(x0, m.height, m.width)
            rewards = self.score(images, group_prompts, ctx.step, ctx.python_rng()).float()
        win, lose = best_and_worst(rewards, d.group_size)
        info = {"reward": float(rewards.mean()), "reward_gap": float((rewards[win] - rewards[lose]).mean()),
                "tie_fraction": zero_std_fraction(rewards, d.group_size)}
        return prompts, x0[win.to(x0.device)], x0[lose.to(x0.device)], info

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self, ctx: StepContext, backward: Backward) -> StepOutput:
        d, m = self.cfg.dpo, self.cfg.model
        if self.refresh_due(ctx.step):
            self.snapshot.capture(self.adapter.transformer)
        prompts, x_w, x_l, info = (self.offline_pairs if self.pairs is not None else self.online_pairs)(ctx)
        n = len(prompts)
        embeds = self.adapter.encode_prompts(prompts + prompts)
        velocity = train_velocity(self.adapter, embeds, d.train_guidance, m.height, m.width)
        x = torch.cat([x_w, x_l]).float()
        gen = ctx.generator(STREAM_DRAWS)
        total, inside_all, sig_all, err = 0.0, [], [], {"w": 0.0, "l": 0.0}
        for _ in range(d.timestep_draws):
            eps = randn_like(x_w.float(), gen)
            sig = logit_normal_train_sigmas(n, gen, self.cfg.sampling.shift, d.logit_mean, d.logit_std,
                                            d.timestep_levels).to(x.device)
            eps, sig = torch.cat([eps, eps]), torch.cat([sig, sig])  # winner and loser share eps and sigma
            x_t = flow.interpolate(x, eps, sig)
            with torch.no_grad(), self.reference():  # before the differentiable pass (weights may be swapped)
                ref = flow_matching_mse(velocity(x_t, sig), x, eps)
            mse = flow_matching_mse(velocity(x_t, sig), x, eps)
            losses, inside = dpo_loss(mse[:n], mse[n:], ref[:n], ref[n:], d.beta)
            loss = losses.mean() / d.timestep_draws
            backward(loss)
            total += float(loss.detach())
            inside_all.append(inside.detach())
            sig_all.append(sig[:n])
            err["w"] += float((mse[:n] - ref[:n]).detach().mean()) / d.timestep_draws
            err["l"] += float((mse[n:] - ref[n:]).detach().mean()) / d.timestep_draws
        inside = torch.cat(inside_all)
        metrics = {"dpo_accuracy": float((inside > 0).float().mean()), "dpo_margin": float(inside.mean()),
                   "dpo_w_diff": err["w"], "dpo_l_diff": err["l"], "dpo_sigma": float(torch.cat(sig_all).mean()),
                   "dpo_ref_age": float(self._ref_age(ctx.step))}
        if self.pairs is None:
            metrics.update({"dpo_reward_gap": info["reward_gap"], "dpo_tie_fraction": info["tie_fraction"]})
        reward = info.get("reward", 0.0)
        return StepOutput(loss=total, reward=reward, metrics=metrics)

    def _ref_age(self, step: int) -> int:
        """Steps since the reference was last refreshed (since step 0 when it is the base model)."""
        k = self.cfg.dpo.ref_update_step
        return step % k if k > 0 else step

    def nfe(self, batch: int) -> dict[str, float]:
        """Per step: online, ``sampling_steps`` calls per sample of ``batch * group_size`` without gradient; then
        per draw the reference's and the policy's passes on ``2 * batch`` latents (times 2 with CFG)."""
        d = self.cfg.dpo
        cfg_x = 2 if d.train_guidance > 1 and not self.adapter.has_guidance_embedding else 1
        cfg_r = 2 if d.guidance > 1 and not self.adapter.has_guidance_embedding else 1
        rollout = 0 if d.data == "offline" else d.sampling_steps * batch * d.group_size * cfg_r
        per_draw = 2 * batch * d.timestep_draws * cfg_x
        return {"nfe_no_grad": rollout + per_draw, "nfe_grad": per_draw}


SPEC = MethodSpec("dpo", "dpo", DPOConfig, DPO,
                  "Diffusion-DPO: offline preference pairs or online best-vs-worst pairs, reference refreshed every K")

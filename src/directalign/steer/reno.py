"""ReNO: reward-based noise optimisation (Eyring et al. 2024, arXiv 2406.04312; code ``ExplainableML/ReNO``
``training/trainer.py``): gradient ascent on the initial noise z through a few-step ODE generation and a
differentiable reward, with a prior that keeps ``|z|`` at the typical norm of a standard normal.

Iteration i = 0, 1, ..., ``iterations`` generates ``x(z_i)`` with ``gen_steps`` ODE steps (default: the sampling
steps), scores it, and (except after the last) takes one step of SGD with Nesterov momentum on

    loss(z) = -r(x(z)) + reg * (|z|^2 / 2 - (d - 1) log |z|)        (d = number of elements of z)

whose prior term is the negative log-density of ``|z|`` under a chi distribution with d degrees of freedom, minimal
at ``|z| = sqrt(d - 1)`` (:func:`norm_prior`). The gradient of each slot is clipped to norm ``grad_clip`` on its own
(the reference optimises one image at a time, so a batch-wide clip would couple the slots). The image of the best
iterate (highest reward; ties keep the earlier) is returned, so ``iterations = 0`` is plain sampling. Defaults are
the reference's: SGD lr 5, momentum 0.9 with Nesterov, 50 iterations (the reference renders 50 images and steps 49
times; here 51 and 50), clip 0.1, reg 0.01.

Only the noise receives gradient: the model and the reward stay frozen (they are run under autograd but their
parameters are not touched and their ``requires_grad`` is switched off for the run).

Costs per slot: NFE with gradient = gen_steps x iterations; NFE without gradient = gen_steps (the last image, which
is never differentiated); reward calls = iterations + 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .base import (
    SteerResult,
    SteerSettings,
    check,
    chunks,
    option,
    options_of,
    seed_noise,
)
from .noise_opt import frozen, optimise_noise
from .options import (
    NoiseOptimisationOptions,
    grad_clip_option,
    iterations_option,
    lr_option,
)
from .sde import sde_sample


@dataclass
class ReNOOptions(NoiseOptimisationOptions):
    iterations: int = iterations_option(50)
    lr: float = lr_option(5.0)
    grad_clip: float = grad_clip_option(0.1)
    reg: float = option(0.01, "weight of the noise-norm prior")
    gen_steps: int = option(0, "ODE steps of the generation being differentiated (0: the sampling steps)")

    def validate(self) -> None:
        super().validate()
        check(self.reg >= 0, "reg", f"must be >= 0, got {self.reg}", self)
        check(self.gen_steps >= 0, "gen_steps", f"must be >= 0, got {self.gen_steps}", self)


def norm_prior(z: torch.Tensor) -> torch.Tensor:
    """``|z|^2 / 2 - (d - 1) log |z|`` per row of ``z`` (B, ...) -> (B,): minus the log-density of the norm of a
    d-dimensional standard normal, up to a constant; minimal at ``|z| = sqrt(d - 1)``."""
    flat = z.float().flatten(1)
    norm = flat.norm(dim=1)
    return 0.5 * norm**2 - (flat.shape[1] - 1) * torch.log(norm)


def reno(adapter, score_fn, prompts: list[str], seeds: list[int], settings: SteerSettings, o: ReNOOptions
         ) -> SteerResult:
    """See the module docstring. ``chosen`` per slot: the ``iteration`` whose image is returned and the
    ``start_reward`` of the unoptimised noise (iteration 0)."""
    t0 = time.perf_counter()
    s = settings
    gen = SteerSettings(o.gen_steps or s.steps, s.shift, s.guidance, s.height, s.width, s.batch_size)
    images, rewards, noises, chosen, calls = [], [], [], [], 0
    with frozen(adapter.transformer, getattr(adapter, "vae", None)):
        for sl in chunks(len(prompts), s.batch_size):
            p = prompts[sl]
            embeds = adapter.encode_prompts(p)
            z = torch.cat([seed_noise(adapter, sd, s) for sd in seeds[sl]]).float().requires_grad_(True)

            def generate(leaves, p=p, embeds=embeds):
                x0 = sde_sample(adapter, embeds, leaves[0], None, gen, eta=0.0,
                                on_step=None if s.on_step is None else (lambda: s.on_step(len(p))))
                return adapter.decode(x0.to(adapter.dtype), s.height, s.width).float()

            def objective(leaves, r):
                return -r + o.reg * norm_prior(leaves[0])

            opt = torch.optim.SGD([z], lr=o.lr, momentum=0.9, nesterov=True)
            res = optimise_noise(score_fn, p, [z], generate, objective, opt, o.iterations, o.grad_clip)
            images.append(res.images)
            rewards.append(res.rewards)
            noises.append(res.leaves[0].cpu())
            calls += res.reward_calls
            chosen += [{"iteration": int(i), "start_reward": float(f)}
                       for i, f in zip(res.best_iteration, res.start_rewards)]
    n = len(prompts)
    return SteerResult(torch.cat(images), torch.cat(rewards), chosen, torch.cat(noises),
                       nfe_no_grad=gen.steps * n, nfe_grad=gen.steps * o.iterations * n, reward_calls=calls,
                       seconds=time.perf_counter() - t0)


class ReNO:
    name = "reno"
    Options = ReNOOptions

    def run(self, adapter, score_fn, prompts, seeds, settings: SteerSettings) -> SteerResult:
        return reno(adapter, score_fn, prompts, seeds, settings, options_of(self, settings))

    def nfe(self, n_images: int, settings: SteerSettings) -> int:
        o = options_of(self, settings)
        return (o.gen_steps or settings.steps) * (o.iterations + 1) * n_images

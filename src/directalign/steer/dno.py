"""Direct Noise Optimisation (Tang et al. 2025, arXiv 2405.18881; code ``TZW1998/Direct-Noise-Optimization``
``dno_stable_diffusion.py``): optimise every noise of the stochastic sampler -- the initial noise and each injected
SDE noise -- by backpropagating a differentiable reward through the whole sampling chain, with gradient
checkpointing (each step's model call is recomputed in the backward pass, so memory holds one step's activations),
AdamW, and a probability regulariser that keeps the noise in the high-probability region of a standard normal.

The sampler is :func:`directalign.steer.sde.sde_sample` with noise level ``eta`` (0: the ODE, where only the initial
noise exists). Iteration i = 0, ..., ``iterations`` renders the current noises, scores them and (except after the
last) takes one AdamW step on ``-r + gamma * R(noises)``, each slot's gradient clipped to ``grad_clip`` on its own;
the best iterate is returned, so ``iterations = 0`` is plain sampling from the same seeds.

The regulariser R (:func:`probability_regulariser`, the reference's ``compute_probability_regularization``): split
the slot's noises, flattened, into n rows of ``block`` entries (in order, and after each of ``permutations`` random
shuffles). For i.i.d. N(0, 1) entries the row mean m satisfies ``n |m|^2 ~ chi^2_block`` and the row covariance
``C = rows^T rows / n`` concentrates around I with ``|C - I|_2 <~ 2 sqrt(block / n)``; R is minus the sum of the two
tail log-bounds ``min(-n |m|^2 / (2 block), -log 2)`` and ``min(-n (max(sqrt(1 + |C - I|_2) - 1 - sqrt(block / n),
0))^2 / 2, -log 2)`` over the ordered split plus their mean over the shuffles. Gaussian-looking noise sits at the
floor ``4 log 2``; shifted or inflated noise pays in proportion to n.

Defaults are the reference's: 50 sampling steps' worth of noises (here: the sampling steps), eta 1, AdamW lr 0.01
(its default weight decay 0.01), 100 optimisation steps, clip 1.0, block 4, 100 shuffles; gamma 1 as its README's
example against out-of-distribution reward hacking (the script's own default, 0, turns the regulariser off).

Costs per slot: NFE with gradient = steps x iterations (plus as many recomputed in the backward pass,
``extra["nfe_recomputed"]``); NFE without gradient = steps; reward calls = iterations + 1.
"""

from __future__ import annotations

import math
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
    check_eta,
    eta_option,
    grad_clip_option,
    iterations_option,
    lr_option,
)
from .sde import sde_sample, step_noises, sub_seed


@dataclass
class DNOOptions(NoiseOptimisationOptions):
    iterations: int = iterations_option(100)
    lr: float = lr_option(0.01)
    grad_clip: float = grad_clip_option(1.0)
    gamma: float = option(1.0, "weight of the probability regulariser (0: off)")
    eta: float = eta_option(1.0)
    block: int = option(4, "entries per row of the probability regulariser's split")
    permutations: int = option(100, "random shuffles the probability regulariser averages over")

    def validate(self) -> None:
        super().validate()
        check(self.gamma >= 0, "gamma", f"must be >= 0, got {self.gamma}", self)
        check_eta(self)
        check(self.block >= 1, "block", f"must be at least 1, got {self.block}", self)
        check(self.permutations >= 0, "permutations", f"must be 0 or more, got {self.permutations}", self)


def _tail_log_bounds(flat: torch.Tensor, block: int) -> torch.Tensor:
    """The mean and covariance tail log-bounds (module docstring) of one split of ``flat`` (D,), summed."""
    n = flat.numel() // block
    rows = flat[: n * block].view(n, block)
    mean = rows.mean(dim=0)
    cov = rows.T @ rows / n
    dev = torch.linalg.matrix_norm(cov - torch.eye(block, dtype=cov.dtype, device=cov.device), ord=2)
    log_mean = torch.clamp(-n * mean.pow(2).sum() / (2 * block), max=-math.log(2))
    excess = torch.clamp(torch.sqrt(1 + dev) - 1 - math.sqrt(block / n), min=0)
    log_cov = torch.clamp(-n * excess**2 / 2, max=-math.log(2))
    return log_mean + log_cov


def probability_regulariser(noise: torch.Tensor, block: int = 4, permutations: int = 100,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """R of one slot's noises ``noise`` (any shape; flattened), a scalar >= 4 log 2 (module docstring).
    Differentiable; the shuffles come from ``generator``."""
    flat = noise.float().flatten()
    total = -_tail_log_bounds(flat, block)
    if permutations:
        shuffled = [_tail_log_bounds(flat[torch.randperm(flat.numel(), generator=generator).to(flat.device)], block)
                    for _ in range(permutations)]
        total = total - torch.stack(shuffled).mean()
    return total


def dno(adapter, score_fn, prompts: list[str], seeds: list[int], settings: SteerSettings, o: DNOOptions
        ) -> SteerResult:
    """See the module docstring. ``chosen`` per slot: the ``iteration`` whose image is returned and the
    ``start_reward`` of iteration 0 (plain sampling)."""
    t0 = time.perf_counter()
    s = settings
    images, rewards, noises, chosen, calls = [], [], [], [], 0
    with frozen(adapter.transformer, getattr(adapter, "vae", None)):
        for sl in chunks(len(prompts), s.batch_size):
            p, sd = prompts[sl], seeds[sl]
            embeds = adapter.encode_prompts(p)
            leaves = [torch.cat([seed_noise(adapter, x, s) for x in sd]).float().requires_grad_(True)]
            if o.eta > 0 and s.steps > 1:  # (B, steps - 1, ...): the slot on dim 0 like the initial noise
                zs = torch.cat([step_noises(adapter, x, 0, s) for x in sd], dim=1).transpose(0, 1)
                leaves.append(zs.contiguous().float().requires_grad_(True))
            def generate(ls, p=p, embeds=embeds):
                zs_t = ls[1].transpose(0, 1) if len(ls) > 1 else None
                x0 = sde_sample(adapter, embeds, ls[0], zs_t, s, o.eta, checkpoint=True,
                                on_step=None if s.on_step is None else (lambda: s.on_step(len(p))))
                return adapter.decode(x0.to(adapter.dtype), s.height, s.width).float()

            def objective(ls, r, sd=sd, rounds=[0]):  # noqa: B006 (the per-batch call counter seeds the shuffles)
                if o.gamma == 0:
                    return -r
                rounds[0] += 1
                reg = []
                for row, seed in enumerate(sd):
                    g = torch.Generator().manual_seed(sub_seed("dno-reg", seed, rounds[0]))
                    slot_noise = torch.cat([leaf[row].flatten() for leaf in ls])
                    reg.append(probability_regulariser(slot_noise, o.block, o.permutations, g))
                return -r + o.gamma * torch.stack(reg).to(r.device)

            opt = torch.optim.AdamW(leaves, lr=o.lr)
            res = optimise_noise(score_fn, p, leaves, generate, objective, opt, o.iterations, o.grad_clip)
            images.append(res.images)
            rewards.append(res.rewards)
            noises.append(res.leaves[0].cpu())
            calls += res.reward_calls
            chosen += [{"iteration": int(i), "start_reward": float(f)}
                       for i, f in zip(res.best_iteration, res.start_rewards)]
    n = len(prompts)
    return SteerResult(torch.cat(images), torch.cat(rewards), chosen, torch.cat(noises), nfe_no_grad=s.steps * n,
                       nfe_grad=s.steps * o.iterations * n, reward_calls=calls, seconds=time.perf_counter() - t0,
                       extra={"nfe_recomputed": s.steps * o.iterations * n})


class DNO:
    name = "dno"
    Options = DNOOptions

    def run(self, adapter, score_fn, prompts, seeds, settings: SteerSettings) -> SteerResult:
        return dno(adapter, score_fn, prompts, seeds, settings, options_of(self, settings))

    def nfe(self, n_images: int, settings: SteerSettings) -> int:
        return settings.steps * (options_of(self, settings).iterations + 1) * n_images

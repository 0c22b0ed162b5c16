"""Best-of-N: N independent initial noises per (prompt, seed) slot through the deterministic ODE sampler, keep the
image the reward scores highest (Ma et al. 2025, arXiv 2501.09732, "random search").

Candidate j of the slot with seed s starts from the noise of seed ``s + CANDIDATE_STRIDE * j`` (candidate 0 is the
plain ``directalign sample`` image of seed s; the same rule as the held-out ``eval.best_of``). Ties keep the earlier
candidate. Costs: NFE = steps x N x slots, all without gradient; reward calls = N x slots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .base import (
    SteerResult,
    SteerSettings,
    check,
    option,
    options_of,
    sample_from_noise,
    seed_noise,
)

CANDIDATE_STRIDE = 100_003


def candidate_seed(seed: int, j: int) -> int:
    """The noise seed of candidate ``j`` of a slot with seed ``seed``."""
    return int(seed) + CANDIDATE_STRIDE * j


@dataclass
class BestOfNOptions:
    n: int = option(4, "candidates (initial noises, or particles for fk) per image")

    def validate(self) -> None:
        check(self.n >= 1, "n", f"must be at least 1, got {self.n}", self)


def best_of(adapter, score_fn, prompts: list[str], seeds: list[int], settings: SteerSettings, n: int) -> SteerResult:
    """Best-of-``n`` (see the module docstring); the result's ``chosen`` holds ``candidate`` and ``noise_seed`` per
    slot (``directalign sample --seeds NOISE_SEED`` regenerates the image)."""
    t0 = time.perf_counter()
    best = rewards = noises = None
    idx = torch.zeros(len(prompts), dtype=torch.long)
    for j in range(n):
        noise = torch.cat([seed_noise(adapter, candidate_seed(s, j), settings) for s in seeds])
        images = sample_from_noise(adapter, prompts, noise, settings)
        with torch.no_grad():
            r = score_fn(images, prompts).float().cpu()
        if best is None:
            best, rewards, noises = images, r, noise.clone()
            continue
        win = r > rewards
        best[win], rewards[win], noises[win], idx[win] = images[win], r[win], noise[win], j
    chosen = [{"candidate": int(j), "noise_seed": candidate_seed(s, int(j))} for s, j in zip(seeds, idx)]
    total = len(prompts) * n
    return SteerResult(best, rewards, chosen, noises, nfe_no_grad=settings.steps * total, reward_calls=total,
                       seconds=time.perf_counter() - t0)


class BestOfN:
    name = "best-of-n"
    Options = BestOfNOptions

    def run(self, adapter, score_fn, prompts, seeds, settings: SteerSettings) -> SteerResult:
        return best_of(adapter, score_fn, prompts, seeds, settings, options_of(self, settings).n)

    def nfe(self, n_images: int, settings: SteerSettings) -> int:
        return settings.steps * options_of(self, settings).n * n_images

"""Zero-order noise search: start from best-of-N's best noise, then for ``rounds`` rounds draw ``neighbors``
perturbations of the current best noise, ``sqrt(1 - lambda^2) * eps + lambda * z`` with fresh standard normal z (a
standard normal eps stays standard normal: variance (1 - lambda^2) + lambda^2 = 1), and keep the best (ties keep the
incumbent, so the result is never worse than its start).

The z of slot seed s, round r, neighbour k comes from a generator seeded by (s, r, k) alone, so a run is
deterministic and a slot's path does not depend on the other slots. Costs: NFE = steps x (N + rounds x neighbors) x
slots, all without gradient; reward calls = (N + rounds x neighbors) x slots.
"""

from __future__ import annotations

import hashlib
import math
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
)
from .best_of_n import best_of


@dataclass
class NoiseSearchOptions:
    n: int = option(4, "candidates (initial noises) per image")
    rounds: int = option(2, "rounds of perturbing the best noise")
    neighbors: int = option(4, "perturbations per round")
    lam: float = option(0.3, "perturbation size in (0, 1]: sqrt(1-l^2)*eps + l*z", flag="lambda")

    def validate(self) -> None:
        check(self.n >= 1, "n", f"must be at least 1, got {self.n}", self)
        check(self.rounds >= 0, "rounds", f"must be 0 or more, got {self.rounds}", self)
        check(self.neighbors >= 1, "neighbors", f"must be at least 1, got {self.neighbors}", self)
        check(0.0 < self.lam <= 1.0, "lam", f"must lie in (0, 1], got {self.lam}", self)


def perturb(eps: torch.Tensor, z: torch.Tensor, lam: float) -> torch.Tensor:
    """``sqrt(1 - lam^2) * eps + lam * z``: a standard normal eps and independent z give a standard normal."""
    return math.sqrt(1.0 - lam * lam) * eps + lam * z


def neighbor_seed(seed: int, round_: int, k: int) -> int:
    """The seed of the perturbation z of slot seed ``seed`` in round ``round_`` (1-based), neighbour ``k``."""
    digest = hashlib.sha256(f"noise-search:{int(seed)}:{round_}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _neighbor_noise(adapter, seed: int, round_: int, k: int, settings: SteerSettings) -> torch.Tensor:
    g = torch.Generator().manual_seed(neighbor_seed(seed, round_, k))
    return adapter.noise(1, settings.height, settings.width, g)


def noise_search(adapter, score_fn, prompts: list[str], seeds: list[int], settings: SteerSettings,
                 opts: NoiseSearchOptions) -> SteerResult:
    """See the module docstring. ``chosen`` per slot: the best-of-N ``candidate`` it started from, and the
    ``round`` and ``neighbor`` of the winning perturbation (round 0: the start itself won). ``extra["start_rewards"]``
    holds the best-of-N rewards it began from."""
    t0 = time.perf_counter()
    start = best_of(adapter, score_fn, prompts, seeds, settings, opts.n)
    images, rewards, noises = start.images.clone(), start.rewards.clone(), start.noises.clone()
    chosen = [{"candidate": c["candidate"], "round": 0, "neighbor": None} for c in start.chosen]
    for r in range(1, opts.rounds + 1):
        center = noises.clone()  # this round's neighbours all perturb the best noise of the previous rounds
        for k in range(opts.neighbors):
            z = torch.cat([_neighbor_noise(adapter, s, r, k, settings) for s in seeds])
            noise = perturb(center.float(), z.float(), opts.lam).to(center.dtype)
            cand = sample_from_noise(adapter, prompts, noise, settings)
            with torch.no_grad():
                score = score_fn(cand, prompts).float().cpu()
            win = score > rewards
            images[win], rewards[win], noises[win] = cand[win], score[win], noise[win]
            for i in torch.nonzero(win).flatten().tolist():
                chosen[i]["round"], chosen[i]["neighbor"] = r, k
    extra_calls = len(prompts) * opts.rounds * opts.neighbors
    return SteerResult(images, rewards, chosen, noises, nfe_no_grad=start.nfe_no_grad + settings.steps * extra_calls,
                       reward_calls=start.reward_calls + extra_calls, seconds=time.perf_counter() - t0,
                       extra={"start_rewards": start.rewards.tolist()})


class NoiseSearch:
    name = "noise-search"
    Options = NoiseSearchOptions

    def run(self, adapter, score_fn, prompts, seeds, settings: SteerSettings) -> SteerResult:
        return noise_search(adapter, score_fn, prompts, seeds, settings, options_of(self, settings))

    def nfe(self, n_images: int, settings: SteerSettings) -> int:
        o = options_of(self, settings)
        return settings.steps * (o.n + o.rounds * o.neighbors) * n_images

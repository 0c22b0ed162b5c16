"""Feynman-Kac steering (Singhal et al. 2025, arXiv 2501.06848; code ``zacharyhorvitz/Fk-Diffusion-Steering``
``text_to_image/fkd_diffusers/fkd_class.py``): ``n`` particles per slot on the stochastic sampler of
:mod:`directalign.steer.sde`; at the resampling steps each particle's clean prediction ``x0_hat = x - sigma v`` is
decoded and scored, weighted by a potential and the population resampled, so compute flows to promising paths.

Potentials of a particle with reward r_t now and the running statistic h of its lineage (``potential``):

* ``max``:  log w = lambda * max(h, r_t), h <- max(h, r_t)   (h starts at -inf)
* ``add``:  log w = lambda * (h + r_t),   h <- h + r_t       (h starts at 0)
* ``diff``: log w = lambda * (r_t - h),   h <- r_t           (h starts at 0)

Resampling draws ``n`` ancestors from softmax(log w) (multinomial, with replacement) at every resampling step
(``resampling: multinomial``) or only when the effective sample size ``1 / sum p_i^2`` falls below
``ess_threshold * n`` (``ess``). Resampling steps are ``round(f * steps)`` for f in ``resample_start,
resample_start + resample_every, ... <= resample_end`` (the reference's default: every 20 of 100 steps within
[20, 80]). At the last step the particle with the highest reward is returned.

Where this differs from the reference on purpose:

* uniform weights (lambda = 0, or equal rewards) never resample: a uniform multinomial draw only duplicates and drops
  particles at random, which adds variance and no information. So lambda = 0 gives ``n`` independent SDE samples and
  returns the best of them (best-of-n on the SDE sampler);
* the ``max`` statistic starts at -inf, not the reference's ``reward_min_value = 0``, so rewards below zero (the SRPO
  relative forms) still steer;
* weights are normalised in log space (softmax) instead of clamping ``exp`` at 1e10;
* the reference resamples once more at the last step with a potential corrected by the product of earlier weights and
  then sorts by reward; taking the best particle directly never returns a worse image.

Costs: NFE = steps x n x slots, without gradient; reward calls (and VAE decodes) = n x (resampling steps + 1) x slots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import flow
from .base import (
    SteerResult,
    SteerSettings,
    check,
    chunks,
    option,
    options_of,
    seed_noise,
)
from .best_of_n import candidate_seed
from .options import check_eta, eta_option
from .sde import clean_prediction, step_noises, sub_seed, transition, velocity_at

POTENTIALS = ("max", "add", "diff")


@dataclass
class FKOptions:
    n: int = option(4, "particles per image")
    lam: float = option(10.0, "potential temperature lambda >= 0 (0: independent particles)", flag="lambda")
    potential: str = option("max", "potential of the rewards along a lineage", choices=POTENTIALS)
    resampling: str = option("multinomial", "resample at every resampling step (multinomial) or when the effective "
                             "sample size falls below --steer-ess-threshold x particles (ess)",
                             choices=("multinomial", "ess"))
    ess_threshold: float = option(0.5, "ESS fraction below which --steer-resampling ess resamples")
    resample_start: float = option(0.2, "first resampling step, as a fraction of the steps")
    resample_end: float = option(0.8, "last resampling step, as a fraction of the steps")
    resample_every: float = option(0.2, "resampling interval, as a fraction of the steps")
    eta: float = eta_option(0.7)

    def validate(self) -> None:
        check(self.n >= 1, "n", f"must be at least 1, got {self.n}", self)
        check(self.lam >= 0, "lam", f"must be >= 0 for fk, got {self.lam}", self)
        check(0 < self.ess_threshold <= 1, "ess_threshold", f"must lie in (0, 1], got {self.ess_threshold}", self)
        for name in ("resample_start", "resample_end"):
            v = getattr(self, name)
            check(0 <= v <= 1, name, f"must lie in [0, 1], got {v}", self)
        check(self.resample_start <= self.resample_end, "resample_end",
              f"must be >= --steer-resample-start ({self.resample_start}), got {self.resample_end}", self)
        check(0 < self.resample_every <= 1, "resample_every", f"must lie in (0, 1], got {self.resample_every}", self)
        check_eta(self)


def resampling_steps(steps: int, start: float, end: float, every: float) -> list[int]:
    """Step indices (0-based, before the last step) at which the population is resampled."""
    out, f = [], start
    while f <= end + 1e-9:
        i = round(f * steps)
        if 0 <= i < steps - 1 and i not in out:
            out.append(i)
        f += every
    return out


def potential_log_weights(potential: str, rewards: torch.Tensor, history: torch.Tensor, lam: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_w, new_history)`` (both (k,)) of the particles' rewards now and their lineages' statistic (module
    docstring)."""
    if potential == "max":
        h = torch.maximum(history, rewards)
        return lam * h, h
    if potential == "add":
        h = history + rewards
        return lam * h, h
    if potential == "diff":
        return lam * (rewards - history), rewards.clone()
    raise ValueError(f"unknown potential {potential!r}; choose one of {', '.join(POTENTIALS)}")


def normalised_weights(log_w: torch.Tensor) -> torch.Tensor:
    """softmax(log_w) in float64 (k,)."""
    return torch.softmax(log_w.double(), dim=0)


def effective_sample_size(log_w: torch.Tensor) -> float:
    """``1 / sum p_i^2`` of the normalised weights: k for uniform weights, 1 when one particle holds all weight."""
    p = normalised_weights(log_w)
    return float(1.0 / (p * p).sum())


def resample_indices(log_w: torch.Tensor, scheme: str, ess_threshold: float, generator: torch.Generator
                     ) -> torch.Tensor | None:
    """Ancestor indices (k,) drawn with replacement from softmax(log_w), or None when nothing is resampled:
    uniform weights, or ``scheme == "ess"`` with ESS >= ``ess_threshold * k``."""
    k = log_w.numel()
    if bool((log_w == log_w[0]).all()):
        return None
    if scheme == "ess" and effective_sample_size(log_w) >= ess_threshold * k:
        return None
    return torch.multinomial(normalised_weights(log_w).float(), k, replacement=True, generator=generator)


def _initial_history(potential: str, k: int) -> torch.Tensor:
    return torch.full((k,), float("-inf") if potential == "max" else 0.0)


def fk_steer(adapter, score_fn, prompts: list[str], seeds: list[int], settings: SteerSettings, o: FKOptions
             ) -> SteerResult:
    """See the module docstring. ``chosen`` per slot: the returned ``particle``, its lineage's initial ``ancestor``
    (its initial noise is that of best-of-n's candidate ``ancestor``) and the number of resampling events
    ``resampled``."""
    t0 = time.perf_counter()
    s, k = settings, o.n
    sigmas = flow.sigma_schedule(s.steps, s.shift)
    when = set(resampling_steps(s.steps, o.resample_start, o.resample_end, o.resample_every))
    images, rewards, noises, chosen, calls = [], [], [], [], 0
    for sl in chunks(len(prompts), max(1, s.batch_size // k)):
        slot_prompts, slot_seeds = prompts[sl], seeds[sl]
        rows_prompts = [p for p in slot_prompts for _ in range(k)]
        embeds = adapter.encode_prompts(rows_prompts)
        init = torch.cat([seed_noise(adapter, candidate_seed(sd, j), s) for sd in slot_seeds for j in range(k)])
        zs = torch.cat([step_noises(adapter, sd, j, s) for sd in slot_seeds for j in range(k)], dim=1).float()
        x = init.float()
        n_slots = len(slot_prompts)
        history = torch.cat([_initial_history(o.potential, k) for _ in range(n_slots)])
        lineage = torch.arange(k).repeat(n_slots)
        events = [0] * n_slots
        with torch.no_grad():
            for i in range(s.steps):
                v = velocity_at(adapter, x, float(sigmas[i]), embeds, s)
                if s.on_step is not None:
                    s.on_step(len(rows_prompts))
                x_next = transition(x, v, sigmas, i, zs[i].to(x.device) if i < s.steps - 1 else None, o.eta,
                                    "flow")
                if i not in when:
                    x = x_next
                    continue
                x0_hat = clean_prediction(x, v, float(sigmas[i]))
                r = score_fn(adapter.decode(x0_hat.to(adapter.dtype), s.height, s.width).float(), rows_prompts)
                r, calls = r.float().cpu(), calls + len(rows_prompts)
                log_w, cand = potential_log_weights(o.potential, r, history, o.lam)
                order = torch.arange(len(rows_prompts))
                for slot in range(n_slots):
                    part = slice(slot * k, (slot + 1) * k)
                    g = torch.Generator().manual_seed(sub_seed("fk-resample", slot_seeds[slot], i))
                    idx = resample_indices(log_w[part], o.resampling, o.ess_threshold, g)
                    if idx is not None:
                        order[part] = idx + slot * k
                        events[slot] += 1
                x, history, lineage = x_next[order.to(x_next.device)], cand[order], lineage[order]
            final = adapter.decode(x.to(adapter.dtype), s.height, s.width).float().cpu()
            r = score_fn(final, rows_prompts).float().cpu()
        calls += len(rows_prompts)
        best = r.view(n_slots, k).argmax(dim=1)
        for slot in range(n_slots):
            row = slot * k + int(best[slot])
            anc = int(lineage[row])
            images.append(final[row : row + 1])
            rewards.append(r[row : row + 1])
            noises.append(init[slot * k + anc : slot * k + anc + 1])
            chosen.append({"particle": int(best[slot]), "ancestor": anc, "resampled": events[slot]})
    total = len(prompts) * k
    return SteerResult(torch.cat(images), torch.cat(rewards), chosen, torch.cat(noises),
                       nfe_no_grad=s.steps * total, reward_calls=calls, seconds=time.perf_counter() - t0,
                       extra={"resampling_steps": sorted(when)})


class FKSteering:
    name = "fk"
    Options = FKOptions

    def run(self, adapter, score_fn, prompts, seeds, settings: SteerSettings) -> SteerResult:
        return fk_steer(adapter, score_fn, prompts, seeds, settings, options_of(self, settings))

    def nfe(self, n_images: int, settings: SteerSettings) -> int:
        return settings.steps * options_of(self, settings).n * n_images

"""The pure math of DanceGRPO / Flow-GRPO (:mod:`directalign.methods.grpo`): the SDE transition, its Gaussian
log-probability, the KL between two transitions, group / per-prompt advantages, the PPO-clipped surrogate and the
Flow-GRPO bookkeeping (zero-advantage dropping, the split of one rollout into optimizer steps, the Fast window).

Conventions (diffusers): sigma = 1 noise, ``x_s = s * eps + (1 - s) * x0``, velocity ``v = eps - x0``; the score of
the marginal is ``-(x + (1 - s) v) / s``. The reverse-time SDE with the ODE's marginals, for a diffusion coefficient
g(s), by Euler-Maruyama from s to s' < s (``ds = s' - s < 0``):

    x' = mean + std * z,   mean = x + ds * (v - g^2 / 2 * score),   std = g * sqrt(-ds)

``dance``: g = eta (DanceGRPO, XueZeyue/DanceGRPO ``fastvideo/train_grpo_flux.py`` ``flux_step``); ``flow``:
g = eta * sqrt(s / (1 - s)) with s = 1 replaced by the schedule's second sigma (Flow-GRPO,
yifan123/flow_grpo@ac4c86e ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``: ``std_dev_t`` and its
``prev_sample_mean``, the same mean written around ``sample`` and ``model_output``).
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


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


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
             ) -> torch.Tensor:
    """The deterministic Euler step ``x + (s' - s) v`` in fp32 (the SDE step at eta = 0)."""
    x = x.float()
    return x + (_expand(sigma_next, x) - _expand(sigma, x)) * v.float()


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


def transition_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, sigma: torch.Tensor | float,
                  sigma_next: torch.Tensor | float, form: str) -> torch.Tensor:
    """The KL term per sample (B,): ``exact`` is :func:`gaussian_kl` with the transition's std ``g sqrt(-ds)``;
    ``flow_grpo`` divides by ``2 g^2`` instead (flow_grpo@ac4c86e ``scripts/train_sd3.py`` ``kl_loss`` uses
    ``std_dev_t``, which lacks the ``sqrt(-dt)`` factor), i.e. it is the exact KL times ``-ds``."""
    kl = gaussian_kl(mean, mean_ref, std)
    if form == "exact":
        return kl
    if form == "flow_grpo":
        s = torch.as_tensor(sigma, dtype=torch.float32, device=kl.device)
        sn = torch.as_tensor(sigma_next, dtype=torch.float32, device=kl.device)
        return kl * (s - sn)
    raise ValueError(f"unknown KL form {form!r}; choose exact or flow_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` within consecutive groups of ``group_size`` (unbiased std, DanceGRPO)."""
    r = rewards.float().reshape(-1, group_size)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(rewards.shape)


def prompt_advantages(rewards: torch.Tensor, prompts: list[str], global_std: bool, eps: float = 1e-4,
                      std_all: float | None = None) -> torch.Tensor:
    """Flow-GRPO's per-prompt statistics (flow_grpo@ac4c86e ``flow_grpo/stat_tracking.py``, cleared every epoch):
    the samples of one prompt string form a group, ``A = (r - mean_prompt) / (std + eps)`` with the population std
    of the prompt's rewards, or with ``global_std`` the population std of every reward of the batch (``std_all``
    when given: the batch of all processes, :func:`all_ranks_std`). (S,) fp32."""
    r = rewards.double()
    adv = torch.empty_like(r)
    if global_std:
        std_all = r.std(unbiased=False) if std_all is None else torch.tensor(std_all, dtype=torch.float64)
    for p in dict.fromkeys(prompts):
        idx = torch.tensor([i for i, q in enumerate(prompts) if q == p], device=r.device)
        group = r[idx]
        std = std_all if global_std else group.std(unbiased=False)
        adv[idx] = (group - group.mean()) / (std + eps)
    return adv.float()


def all_ranks_std(rewards: torch.Tensor) -> float | None:
    """The population std of the rewards of every process (an all-reduce of count, sum and sum of squares, as
    flow_grpo's tracker sees the gathered rewards); None on one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
            torch.distributed.get_world_size() < 2:
        return None
    r = rewards.detach().double()
    moments = torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device), r.sum(),
                           (r * r).sum()])
    torch.distributed.all_reduce(moments)
    n, total, squares = moments.tolist()
    return math.sqrt(max(squares / n - (total / n) ** 2, 0.0))


def zero_std_fraction(rewards: torch.Tensor, prompts: list[str]) -> float:
    """The share of prompts whose rewards all agree (population std 0): flow_grpo's ``zero_std_ratio``."""
    groups = [rewards[[i for i, q in enumerate(prompts) if q == p]] for p in dict.fromkeys(prompts)]
    return sum(float(g.std(unbiased=False)) == 0.0 for g in groups) / max(1, len(groups))


def keep_nonzero(adv: torch.Tensor, parts: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of the samples to train (ascending): those with a non-zero advantage, plus randomly chosen
    zero-advantage ones until the count divides by ``parts`` where enough exist (flow_grpo@ac4c86e
    ``scripts/train_sd3.py``: the mask of ``advantages != 0`` topped up to a multiple of ``num_batches_per_epoch``)."""
    mask = adv != 0
    short = (-int(mask.sum())) % parts
    dropped = torch.nonzero(~mask).flatten()
    if short and len(dropped) >= short:
        mask[dropped[torch.randperm(len(dropped), generator=generator)[:short]]] = True
    return torch.nonzero(mask).flatten()


def split_rollout(kept: torch.Tensor, parts: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """The samples of each optimizer step of one rollout: ``kept`` shuffled (when ``parts > 1``, as flow_grpo
    shuffles before re-batching) and cut into ``parts`` nearly equal runs."""
    if parts > 1:
        kept = kept[torch.randperm(len(kept), generator=generator)]
    return list(torch.tensor_split(kept, parts))


def draw_sde_window(size: int, lo: int, hi: int, generator: torch.Generator) -> tuple[int, int]:
    """Flow-GRPO-Fast's branch window: ``start`` uniform on ``lo .. hi - size`` (inclusive), the SDE transitions
    ``[start, start + size)``, every other step deterministic (zhtmike/flow_grpo@3d02fd9
    ``flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_fast.py``: ``random.randint(range[0], range[1] - size)``)."""
    start = int(torch.randint(lo, hi - size + 1, (1,), generator=generator))
    return start, start + size


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: ``mean(max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps)))``; returns the loss
    and the ratios (B,)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


def approx_kl(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((log p - log p_old)^2)``: the rollout-to-policy drift flow_grpo logs as ``approx_kl``."""
    return 0.5 * ((log_prob.detach() - old_log_prob) ** 2).mean()


def noise_bucket(index: torch.Tensor, transitions: int, buckets: int = 3) -> torch.Tensor:
    """The bucket (0: high noise .. buckets - 1: low noise) of SDE transition ``index`` of ``transitions``."""
    return torch.div(index * buckets, max(1, transitions), rounding_mode="floor").clamp(max=buckets - 1)

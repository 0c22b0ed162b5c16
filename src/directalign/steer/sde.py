"""The stochastic sampler the particle and noise-optimisation steerers share.

The reverse-time SDE of :mod:`directalign.methods.grpo_math` (Flow-GRPO's, ``sde_step``) with the schedule of
:func:`directalign.flow.sigma_schedule`: ``steps - 1`` Euler-Maruyama transitions ``x' = mean + std * z`` followed by
the deterministic clean prediction ``x0 = x - sigma * v`` at the last sigma (as the GRPO rollout ends). With
``eta = 0`` every transition is an Euler step of the probability-flow ODE, so the sampler is the plain ODE sampler.

A sample is fully determined by its initial noise and its ``steps - 1`` injected noises ``z``; particle ``j`` of the
slot with seed ``s`` draws its z from a generator seeded by ``(s, j)`` alone (:func:`step_noises`), so the slot's
path does not depend on the other slots or the batch size.
"""

from __future__ import annotations

import hashlib

import torch

from .. import flow
from ..methods.grpo_math import sde_step
from .base import SteerSettings


def sub_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (stable across runs and platforms)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_noises(adapter, seed: int, particle: int, settings: SteerSettings, tag: str = "sde") -> torch.Tensor:
    """The ``steps - 1`` injected noises (steps - 1, 1, ...) of particle ``particle`` of the slot with seed ``seed``."""
    g = torch.Generator().manual_seed(sub_seed(tag, int(seed), int(particle)))
    n = max(settings.steps - 1, 0)
    return torch.stack([adapter.noise(1, settings.height, settings.width, g) for _ in range(n)]) if n else \
        torch.zeros(0, *adapter.noise(1, settings.height, settings.width, g).shape)


def velocity_at(adapter, x: torch.Tensor, sigma: float, embeds, settings: SteerSettings) -> torch.Tensor:
    """The model's velocity (fp32) at ``x`` (fp32) and ``sigma``; the model sees its own dtype."""
    s = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=adapter.dtype)
    return adapter.velocity(x.to(adapter.dtype), s, embeds, settings.guidance, settings.height,
                            settings.width).float()


def transition(x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, i: int, z: torch.Tensor | None, eta: float,
               kind: str) -> torch.Tensor:
    """The state after step ``i``: an SDE transition to ``sigmas[i + 1]`` with injected noise ``z`` for
    ``i < steps - 1``, the clean prediction ``x - sigma_i * v`` at the last step. fp32, differentiable."""
    last = len(sigmas) - 2
    if i == last:
        return x - float(sigmas[i]) * v
    if eta == 0:
        return flow.euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
    mean, std = sde_step(x, v, float(sigmas[i]), float(sigmas[i + 1]), eta, kind, float(sigmas[1]))
    return mean + std * z


def clean_prediction(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x0_hat = x - sigma * v``: the model's estimate of the clean latent at ``(x, sigma)``."""
    return x - float(sigma) * v


def sde_sample(adapter, embeds, x: torch.Tensor, zs: torch.Tensor, settings: SteerSettings, eta: float,
               kind: str = "flow", checkpoint: bool = False, on_step=None) -> torch.Tensor:
    """The clean latent (B, ...) fp32 from initial noise ``x`` (B, ...) and injected noises ``zs`` (steps - 1, B,
    ...). Differentiable in ``x`` and ``zs`` when autograd is on; ``checkpoint`` recomputes each step's model call in
    the backward pass instead of keeping its activations (memory of one step instead of ``steps``)."""
    from torch.utils.checkpoint import checkpoint as ckpt

    sigmas = flow.sigma_schedule(settings.steps, settings.shift)
    x = x.float()
    for i in range(settings.steps):
        def step(x_in, z_in, i=i):
            return transition(x_in, velocity_at(adapter, x_in, float(sigmas[i]), embeds, settings), sigmas, i,
                              z_in, eta, kind)

        z = zs[i] if zs is not None and i < settings.steps - 1 else None
        if checkpoint and torch.is_grad_enabled():
            x = ckpt(step, x, z, use_reentrant=False)
        else:
            x = step(x, z)
        if on_step is not None:
            on_step()
    return x

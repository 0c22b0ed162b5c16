"""Deterministic sampling with an adapter: the Euler ODE rollout SRPO trains on and evaluation generates with."""

from __future__ import annotations

import torch

from .. import flow
from ..adapters.base import PromptEmbeds


def rollout(adapter, embeds: PromptEmbeds, noise: torch.Tensor, steps: int, shift: float, guidance: float | None,
            height: int, width: int, quantize_timestep: int = 0, on_step=None) -> torch.Tensor:
    """Integrate from ``noise`` (sigma = 1) to a clean latent over ``shift(linspace(1, 0, steps + 1))``.

    Matches ``FluxPipeline(latents=noise, num_inference_steps=steps)`` for a static-shift scheduler. No gradient.
    ``on_step()`` (optional) is called after each step's model call (progress bars).
    """
    sigmas = flow.sigma_schedule(steps, shift).to(noise.device)

    def velocity(x, s):
        v = adapter.velocity(x, flow.quantize_sigma(s, quantize_timestep), embeds, guidance, height, width)
        if on_step is not None:
            on_step()
        return v

    with torch.no_grad():
        return flow.euler_ode(noise, sigmas, velocity)


@torch.no_grad()
def generate(adapter, prompts: list[str], seeds: list[int], steps: int, shift: float, guidance: float | None,
             height: int, width: int, batch_size: int = 32, on_step=None) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for ``prompts[i]`` with ``seeds[i]``; each image depends only on its pair.
    ``on_step()`` (optional) is called after every sampling step of every batch (progress bars)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        p = prompts[start : start + batch_size]
        noise = torch.cat([adapter.noise(1, height, width, torch.Generator().manual_seed(s))
                           for s in seeds[start : start + batch_size]])
        x0 = rollout(adapter, adapter.encode_prompts(p), noise, steps, shift, guidance, height, width,
                     on_step=on_step)
        out.append(adapter.decode(x0, height, width).float().cpu())
    return torch.cat(out)

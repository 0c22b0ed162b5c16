"""What the baseline recipes (ReFL, DRaFT, AlignProp, GRPO) share: the model as a velocity function, sampling
schedules, chains of Euler steps with and without gradient, one-step x0 prediction and the reward of decoded
images under ``reward.form``.

Every recipe satisfies :class:`directalign.methods.base.Method`.

All random draws of a step come from the step's context (seeded from (seed, rank, step)), so resumed runs replay
exactly.
"""

from __future__ import annotations

import random

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .. import flow
from ..adapters.base import PromptEmbeds
from ..engine.context import STREAM_NOISE, StepContext
from ..rewards.relative import ControlWords, semantic_relative_reward


def velocity_fn(adapter, embeds: PromptEmbeds, guidance: float | None, height: int, width: int):
    """``(x, sigma (B,)) -> v``: the adapter's transformer as a function (differentiable when grad is enabled)."""

    def velocity(x, sigma):
        return adapter.velocity(x, sigma, embeds, guidance, height, width)

    return velocity


def encode_texts(items: list[str]) -> torch.Tensor:
    """Strings as one uint8 tensor (UTF-8, NUL-separated), for a method state saved with safetensors."""
    return torch.tensor(list("\x00".join(items).encode("utf-8")), dtype=torch.uint8)


def decode_texts(t: torch.Tensor) -> list[str]:
    """The inverse of :func:`encode_texts`."""
    return bytes(t.tolist()).decode("utf-8").split("\x00")


def schedule(steps: int, shift: float) -> torch.Tensor:
    """The sampler's (steps + 1,) descending sigmas ``shift(linspace(1, 0, steps + 1))`` (float64)."""
    return flow.sigma_schedule(steps, shift)


def one_step_x0(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """ReFL's one-step clean prediction from the model alone: ``x0_hat = x - sigma * v``.

    With ``x = sigma * eps + (1 - sigma) * x0`` and the exact velocity ``v = eps - x0`` it returns ``x0``; it is the
    Euler step from sigma straight to 0. Unlike Direct-Align's recovery, the whole noise comes from the model.
    """
    return flow.euler_step(x, velocity, sigma, 0.0)


def ode_chain(x: torch.Tensor, sigmas: torch.Tensor, velocity, grad: bool, checkpoint: bool = False
              ) -> torch.Tensor:
    """Euler steps along ``sigmas`` (descending; ``len(sigmas) - 1`` model calls).

    ``grad=False`` runs under ``torch.no_grad``. With ``grad=True`` every model call stays in the graph; with
    ``checkpoint=True`` and two or more steps each call is wrapped in ``torch.utils.checkpoint`` (its activations
    are recomputed in the backward pass, so memory holds one step's activations plus the chain of latents; a single
    step gains nothing from it and runs plainly).
    """
    if len(sigmas) < 2:
        return x
    sigmas = sigmas.to(x.device)
    if not grad:
        with torch.no_grad():
            return flow.euler_ode(x, sigmas, velocity)
    checkpoint = checkpoint and len(sigmas) > 2
    for i in range(len(sigmas) - 1):
        s = sigmas[i].to(x.dtype).expand(x.shape[0])
        v = _checkpoint(velocity, x, s, use_reentrant=False) if checkpoint else velocity(x, s)
        x = flow.euler_step(x, v, sigmas[i], sigmas[i + 1])
    return x


def step_noise(adapter, ctx: StepContext, height: int, width: int) -> torch.Tensor:
    """This rank's rows of the initial noise of the step's global batch (one generator every rank seeds alike), so
    W processes with batch b start from the noise of one process with batch W * b."""
    noise = adapter.noise(ctx.global_batch, height, width, ctx.generator(STREAM_NOISE, shared=True))
    return noise[ctx.rows]


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise of ``x``'s shape drawn on the CPU from ``generator`` (device-independent draws)."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


class RewardScorer:
    """The reward a baseline optimises, per image (B,), differentiable through the images.

    ``reward.form = absolute`` (every shipped baseline config, as in the SRPO paper's Table 1): ``s(prompt)``.
    A relative form contrasts the step's control words exactly as SRPO's denoise branch does, with k =
    ``reward.relative_k``, the k the held-out evaluation uses for these methods, so it measures what was trained.
    """

    def __init__(self, cfg, reward):
        self.reward = reward
        self.form = cfg.reward.form
        self.k = cfg.reward.relative_k
        self.control = (ControlWords(tuple(cfg.reward.positive_words), tuple(cfg.reward.negative_words),
                                     cfg.reward.selection) if self.form != "absolute" else None)

    def __call__(self, images: torch.Tensor, prompts: list[str], step: int, rng: random.Random) -> torch.Tensor:
        pos, neg = self.control.pick(step, rng) if self.control is not None else (None, None)
        return semantic_relative_reward(self.reward, images, prompts, self.form, self.k, pos, neg)

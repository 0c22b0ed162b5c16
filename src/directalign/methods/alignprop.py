"""AlignProp (Prabhudesai, Goyal, Pathak, Fragkiadaki 2023, "Aligning Text-to-Image Diffusion Models with Reward
Backpropagation", arXiv 2310.03739), on a rectified-flow model with the deterministic Euler sampler.

Per step: draw a truncation index ``b`` in {0, ..., N - 1} (``alignprop.truncation``: AlignProp's
``backprop_strategy`` gaussian | uniform | fixed); sample ``sigma_0 = 1 > ... > sigma_N = 0`` from the noise, the
model calls ``i < b`` without gradient (AlignProp detaches those predictions) and the calls ``i >= b`` with it, each
wrapped in ``torch.utils.checkpoint`` (``alignprop.checkpoint``); decode, loss ``-r``, backward through the whole
differentiable part of the chain. b = 0 is full backpropagation through sampling; b = N - 1 is DRaFT-1.
Compared with DRaFT-K, the number of differentiable steps is random per step (the randomised truncation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..engine.config import choice, need
from ..engine.context import StepContext, StepOutput
from .base import Backward, BranchResult, MethodSpec, step_output
from .common import RewardScorer, ode_chain, schedule, step_noise, velocity_fn
from .losses import reward_loss


@dataclass
class AlignPropConfig:
    """AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739): backpropagation through the whole sampling chain with
    per-step gradient checkpointing and randomised truncation: model calls before a random step index b get no
    gradient (AlignProp's ``if i < backprop_timestep: noise_pred = noise_pred.detach()``)."""

    sampling_steps: int = 25
    guidance: float = 3.5
    truncation: str = choice("gaussian", "uniform", "fixed")  # gaussian | uniform | fixed (AlignProp's backprop_strategy)
    gaussian: list[float] = field(default_factory=lambda: [21.0, 2.5])  # b ~ round(N(mean, std)); AlignProp:
    #   (42, 5) of 50 steps, scaled to 25
    uniform: list[int] = field(default_factory=lambda: [15, 24])  # b ~ U{lo..hi}; AlignProp: (30, 50) of 50
    fixed: int = 24  # AlignProp: 49 of 50 (one differentiable step)
    checkpoint: bool = True
    loss: str = choice("linear", "hinge")  # -r | hinge
    hinge_threshold: float = 0.7

    def validate(self) -> None:
        need(self.sampling_steps >= 1, f"alignprop.sampling_steps: must be >= 1, got {self.sampling_steps}")
        # only the selected truncation strategy's setting must fit the sampling steps
        if self.truncation == "gaussian":
            need(len(self.gaussian) == 2 and self.gaussian[1] >= 0,
                 f"alignprop.gaussian: need [mean, std] with std >= 0, got {self.gaussian}")
        elif self.truncation == "uniform":
            need(len(self.uniform) == 2 and 0 <= self.uniform[0] <= self.uniform[1] < self.sampling_steps,
                 f"alignprop.uniform: need [lo, hi] with 0 <= lo <= hi < alignprop.sampling_steps "
                 f"({self.sampling_steps}), got {self.uniform}")
        else:
            need(0 <= self.fixed < self.sampling_steps, f"alignprop.fixed: must be in [0, alignprop.sampling_steps - 1 "
                 f"= {self.sampling_steps - 1}], got {self.fixed}")



def truncation_probabilities(kind: str, n_steps: int, gaussian=(0.0, 0.0), uniform=(0, 0), fixed: int = 0
                             ) -> list[float]:
    """P(b = j) for j in 0..n_steps-1.

    * ``gaussian``: ``b = clamp(floor(mean + std * z + 0.5), 0, n_steps - 1)`` with z ~ N(0, 1);
    * ``uniform``: b ~ U{lo, ..., hi};
    * ``fixed``: b = fixed.
    """
    p = [0.0] * n_steps
    if kind == "fixed":
        p[fixed] = 1.0
    elif kind == "uniform":
        lo, hi = uniform
        for j in range(lo, hi + 1):
            p[j] = 1.0 / (hi - lo + 1)
    elif kind == "gaussian":
        mean, std = gaussian
        if std == 0:
            p[min(max(math.floor(mean + 0.5), 0), n_steps - 1)] = 1.0
        else:
            def cdf(x):
                return 0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2))))

            for j in range(n_steps):
                lo = -math.inf if j == 0 else j - 0.5
                hi = math.inf if j == n_steps - 1 else j + 0.5
                p[j] = (1.0 if hi == math.inf else cdf(hi)) - (0.0 if lo == -math.inf else cdf(lo))
    else:
        raise ValueError(f"unknown truncation {kind!r}; choose gaussian, uniform or fixed")
    return p


def draw_truncation(kind: str, n_steps: int, generator: torch.Generator, gaussian=(0.0, 0.0), uniform=(0, 0),
                    fixed: int = 0) -> int:
    """One truncation index b (see :func:`truncation_probabilities`), from ``generator``."""
    if kind == "fixed":
        return fixed
    if kind == "uniform":
        return int(torch.randint(uniform[0], uniform[1] + 1, (1,), generator=generator))
    if kind == "gaussian":
        z = float(torch.randn(1, generator=generator, dtype=torch.float64))
        return min(max(math.floor(gaussian[0] + gaussian[1] * z + 0.5), 0), n_steps - 1)
    raise ValueError(f"unknown truncation {kind!r}; choose gaussian, uniform or fixed")


class AlignProp:
    """The AlignProp recipe; ``cfg`` is a :class:`directalign.config.Config`."""

    def __init__(self, cfg, adapter, reward):
        self.cfg, self.adapter, self.reward = cfg, adapter, reward
        self.sigmas = schedule(cfg.alignprop.sampling_steps, cfg.sampling.shift)
        self.score = RewardScorer(cfg, reward)

    def _truncation_args(self):
        a = self.cfg.alignprop
        return dict(gaussian=tuple(a.gaussian), uniform=tuple(a.uniform), fixed=a.fixed)

    def train_step(self, ctx: StepContext, backward: Backward) -> StepOutput:
        step, prompts, generator, rng = ctx.step, list(ctx.prompts), ctx.generator(), ctx.python_rng()
        noise = step_noise(self.adapter, ctx, self.cfg.model.height, self.cfg.model.width)
        a, m = self.cfg.alignprop, self.cfg.model
        embeds = self.adapter.encode_prompts(prompts)
        b = draw_truncation(a.truncation, a.sampling_steps, generator, **self._truncation_args())
        velocity = velocity_fn(self.adapter, embeds, a.guidance, m.height, m.width)
        x_b = ode_chain(noise, self.sigmas[: b + 1], velocity, grad=False)
        x0_final = ode_chain(x_b, self.sigmas[b:], velocity, grad=True, checkpoint=a.checkpoint)
        rewards = self.score(self.adapter.decode(x0_final, m.height, m.width), prompts, step, rng)
        loss = reward_loss(rewards, a.loss, a.hinge_threshold).mean()
        backward(loss)
        return step_output([BranchResult("alignprop", float(loss.detach()), float(rewards.detach().mean()),
                                         float(self.sigmas[b]))])

    def nfe(self, batch: int) -> dict[str, float]:
        """Expected calls per step: b without gradient and N - b with it (checkpointing recomputes each
        differentiable call once more in the backward pass; that recomputation is not counted)."""
        a = self.cfg.alignprop
        p = truncation_probabilities(a.truncation, a.sampling_steps, **self._truncation_args())
        eb = sum(j * pj for j, pj in enumerate(p))
        return {"nfe_no_grad": eb * batch, "nfe_grad": (a.sampling_steps - eb) * batch}


SPEC = MethodSpec("alignprop", "alignprop", AlignPropConfig, AlignProp,
                  "AlignProp: backprop through the whole chain, checkpointed, randomly truncated")

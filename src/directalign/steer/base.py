"""The steering seam: what a steering algorithm receives and returns.

A steerer takes an adapter, a score function ``score_fn(images (N, 3, H, W) in [0, 1], prompts) -> (N,)`` (higher is
better), the (prompt, seed) slots and a :class:`SteerSettings`, and returns one image per slot in a
:class:`SteerResult` with its costs: NFE (transformer calls, one per sampling step per image; ``nfe_grad`` for calls
under autograd, ``nfe_no_grad`` for the rest), reward calls (images scored) and wall-clock seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import UserError
from ..methods.sampling import rollout


class SteerError(UserError, ValueError):
    """A bad steering option (one line, no traceback on the command line)."""


@dataclass
class SteerSettings:
    steps: int
    shift: float
    guidance: float | None
    height: int
    width: int
    batch_size: int = 32
    n: int = 4  # candidates per slot (best-of-N; the start of noise-search)
    rounds: int = 2  # noise-search rounds
    neighbors: int = 4  # noise-search perturbations of the best noise per round
    lam: float = 0.3  # noise-search perturbation size, in (0, 1]
    on_step: Callable[[int], None] | None = None  # called after each sampling step with the batch's image count

    @classmethod
    def from_config(cls, cfg, **kwargs) -> SteerSettings:
        e, m = cfg.eval, cfg.model
        return cls(e.steps, cfg.sampling.shift, e.guidance, m.height, m.width, e.batch_size, **kwargs)

    def validate(self) -> SteerSettings:
        if self.n < 1:
            raise SteerError(f"--steer-n must be at least 1, got {self.n}")
        if self.rounds < 0:
            raise SteerError(f"--steer-rounds must be 0 or more, got {self.rounds}")
        if self.neighbors < 1:
            raise SteerError(f"--steer-neighbors must be at least 1, got {self.neighbors}")
        if not 0.0 < self.lam <= 1.0:
            raise SteerError(f"--steer-lambda must lie in (0, 1], got {self.lam}")
        return self


@dataclass
class SteerResult:
    images: torch.Tensor  # (N, 3, H, W) in [0, 1], one per slot
    rewards: torch.Tensor  # (N,) the score_fn value of each returned image
    chosen: list[dict]  # per slot: which candidate won (steerer-specific keys, JSON-ready)
    noises: torch.Tensor  # (N, ...) the initial noise of each returned image
    nfe_no_grad: int = 0
    nfe_grad: int = 0
    reward_calls: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # steerer-specific run-level numbers

    def costs(self) -> dict:
        return {"nfe_no_grad": self.nfe_no_grad, "nfe_grad": self.nfe_grad, "reward_calls": self.reward_calls,
                "seconds": round(self.seconds, 3)}


class Steerer(Protocol):
    name: str

    def run(self, adapter, score_fn, prompts: list[str], seeds: list[int], settings: SteerSettings) -> SteerResult:
        ...

    def nfe(self, n_images: int, settings: SteerSettings) -> int:
        """The run's NFE in closed form (its progress bar's span)."""
        ...


def seed_noise(adapter, seed: int, settings: SteerSettings) -> torch.Tensor:
    """The initial noise (1, ...) ``directalign sample`` draws for ``seed``."""
    return adapter.noise(1, settings.height, settings.width, torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def sample_from_noise(adapter, prompts: list[str], noise: torch.Tensor, settings: SteerSettings) -> torch.Tensor:
    """Images (N, 3, H, W) of the deterministic ODE sampler from ``noise`` (N, ...), ``settings.batch_size`` at a
    time, batched exactly as :func:`directalign.methods.sampling.generate` batches (so the same noise gives the same
    images bit for bit)."""
    s, out = settings, []
    for start in range(0, len(prompts), s.batch_size):
        p = prompts[start : start + s.batch_size]
        on_step = None if s.on_step is None else _count(s.on_step, len(p))
        x0 = rollout(adapter, adapter.encode_prompts(p), noise[start : start + s.batch_size], s.steps, s.shift,
                     s.guidance, s.height, s.width, on_step=on_step)
        out.append(adapter.decode(x0, s.height, s.width).float().cpu())
    return torch.cat(out)


def _count(on_step, k: int):
    return lambda: on_step(k)

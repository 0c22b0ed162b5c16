"""The steering seam: what a steering algorithm receives and returns.

A steerer takes an adapter, a score function ``score_fn(images (N, 3, H, W) in [0, 1], prompts) -> (N,)`` (higher is
better; differentiable for the gradient-based steerers), the (prompt, seed) slots and a :class:`SteerSettings`, and
returns one image per slot in a :class:`SteerResult` with its costs: NFE (transformer calls, one per sampling step
per image; ``nfe_grad`` for calls under autograd, ``nfe_no_grad`` for the rest), reward calls (images scored) and
wall-clock seconds.

Each steerer declares its own options as a dataclass (``Steerer.Options``) whose fields carry their help text and,
for a fixed set of values, their choices (:func:`option`); ``validate()`` checks ranges with one-line errors. The
command line derives ``--steer-<field>`` flags from these dataclasses, so adding an option is one field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import UserError
from ..methods.sampling import rollout


class SteerError(UserError, ValueError):
    """A bad steering option (one line, no traceback on the command line)."""


def option(default, help: str, choices: tuple | None = None, flag: str | None = None):
    """A steerer option: its default, help text, allowed values and (when it differs from the field name) its
    ``--steer-<flag>`` name."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def flag_name(f: dataclasses.Field) -> str:
    """The command-line flag of an option field (``--steer-lambda`` for the field ``lam``)."""
    return "--steer-" + (f.metadata.get("flag") or f.name).replace("_", "-")


def check(ok: bool, f_name: str, message: str, options) -> None:
    """Raise a one-line :class:`SteerError` naming the option's flag when ``ok`` is false."""
    if not ok:
        f = next(x for x in dataclasses.fields(options) if x.name == f_name)
        raise SteerError(f"{flag_name(f)} {message}")


def check_choices(options) -> None:
    for f in dataclasses.fields(options):
        allowed = f.metadata.get("choices")
        if allowed and getattr(options, f.name) not in allowed:
            raise SteerError(f"{flag_name(f)} must be one of {', '.join(map(str, allowed))}, "
                             f"got {getattr(options, f.name)!r}")


@dataclass
class SteerSettings:
    """How to sample (the shared part) plus the steerer's own ``options`` (its ``Options`` dataclass)."""

    steps: int
    shift: float
    guidance: float | None
    height: int
    width: int
    batch_size: int = 32
    options: Any = None
    on_step: Callable[[int], None] | None = None  # called after each sampling step with the batch's image count

    @classmethod
    def from_config(cls, cfg, options=None, **kwargs) -> SteerSettings:
        e, m = cfg.eval, cfg.model
        return cls(e.steps, cfg.sampling.shift, e.guidance, m.height, m.width, e.batch_size, options, **kwargs)


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
        return {"nfe": self.nfe_no_grad + self.nfe_grad, "nfe_no_grad": self.nfe_no_grad, "nfe_grad": self.nfe_grad,
                "reward_calls": self.reward_calls, "seconds": round(self.seconds, 3)}


class Steerer(Protocol):
    name: str
    Options: type  # a dataclass of option(...) fields with validate()

    def run(self, adapter, score_fn, prompts: list[str], seeds: list[int], settings: SteerSettings) -> SteerResult:
        ...

    def nfe(self, n_images: int, settings: SteerSettings) -> int:
        """The run's NFE in closed form, with and without gradient (its progress bar's span)."""
        ...


def options_of(steerer, settings: SteerSettings):
    """``settings.options`` (the steerer's defaults when None), validated."""
    opts = settings.options if settings.options is not None else steerer.Options()
    if not isinstance(opts, steerer.Options):
        raise SteerError(f"--steer {steerer.name} takes {steerer.Options.__name__}, got {type(opts).__name__}")
    check_choices(opts)
    opts.validate()
    return opts


def seed_noise(adapter, seed: int, settings: SteerSettings) -> torch.Tensor:
    """The initial noise (1, ...) ``directalign sample`` draws for ``seed``."""
    return adapter.noise(1, settings.height, settings.width, torch.Generator().manual_seed(int(seed)))


def chunks(n: int, size: int):
    """``range`` slices of ``n`` items, ``size`` at a time."""
    for start in range(0, n, max(1, size)):
        yield slice(start, min(n, start + max(1, size)))


@torch.no_grad()
def sample_from_noise(adapter, prompts: list[str], noise: torch.Tensor, settings: SteerSettings) -> torch.Tensor:
    """Images (N, 3, H, W) of the deterministic ODE sampler from ``noise`` (N, ...), ``settings.batch_size`` at a
    time, batched exactly as :func:`directalign.methods.sampling.generate` batches (so the same noise gives the same
    images bit for bit)."""
    s, out = settings, []
    for sl in chunks(len(prompts), s.batch_size):
        p = prompts[sl]
        on_step = None if s.on_step is None else _count(s.on_step, len(p))
        x0 = rollout(adapter, adapter.encode_prompts(p), noise[sl], s.steps, s.shift, s.guidance, s.height, s.width,
                     on_step=on_step)
        out.append(adapter.decode(x0, s.height, s.width).float().cpu())
    return torch.cat(out)


def _count(on_step, k: int):
    return lambda: on_step(k)

"""Option fields more than one steerer has: one help text and one range check each, every steerer its own default.

* :class:`NoiseOptimisationOptions`: the optimiser of the gradient-based noise optimisers (ReNO and DNO,
  :mod:`directalign.steer.noise_opt`): ``iterations``, ``lr`` and ``grad_clip``. A subclass states the three fields
  again with its defaults through :func:`iterations_option`, :func:`lr_option` and :func:`grad_clip_option` (a
  dataclass field stated again keeps its place, so the flags keep their order) and calls ``super().validate()``
  before its own checks.
* :func:`eta_option` / :func:`check_eta`: the noise level of the SDE sampler (:mod:`directalign.steer.sde`), shared
  by FK steering and DNO.

The command line derives one ``--steer-<field>`` flag per field name over all steerers (``directalign.cli.steer``),
so a shared field is one flag with each steerer's default in its help.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import check, option


def iterations_option(default: int):
    return option(default, "optimisation steps (iterations + 1 images per slot; 0: plain sampling)")


def lr_option(default: float):
    return option(default, "learning rate (reno: SGD with Nesterov momentum 0.9; dno: AdamW)")


def grad_clip_option(default: float):
    return option(default, "clip each slot's gradient to this norm (0: off)")


def eta_option(default: float):
    return option(default, "noise level a of the SDE sampler: std = a sqrt(s/(1-s)) sqrt(-ds) (0: the ODE)")


def check_eta(options) -> None:
    """``eta >= 0`` (0 is the deterministic ODE)."""
    check(options.eta >= 0, "eta", f"must be >= 0, got {options.eta}", options)


@dataclass
class NoiseOptimisationOptions:
    """The optimiser options of a noise optimiser; subclasses give the fields their defaults (module docstring)."""

    iterations: int
    lr: float
    grad_clip: float

    def validate(self) -> None:
        check(self.iterations >= 0, "iterations", f"must be 0 or more, got {self.iterations}", self)
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}", self)
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}", self)

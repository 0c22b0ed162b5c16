"""The seam every training method lands on: a :class:`Method` protocol and the :class:`MethodSpec` that registers it.

A method is one module: its config section (a dataclass with ``validate``), its recipe (a class satisfying
:class:`Method`) and a :class:`MethodSpec` naming both; :mod:`directalign.methods.registry` lists the specs, one line
each. The engine calls ``train_step`` once per optimizer step and knows nothing else about the method.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from ..engine.context import StepContext, StepOutput

Backward = Callable[[torch.Tensor], None]


@runtime_checkable
class Method(Protocol):
    """One optimizer step of a fine-tuning method.

    ``train_step`` builds its own inputs from ``ctx`` (rollouts, offline images, noise, this rank's rows of the
    global batch), runs its differentiable passes and calls ``backward(loss_share)`` on each share of the loss (so only
    one share's activations are alive at a time); the engine then reduces gradients, clips and steps the optimizer.
    ``nfe(batch)`` is the number of transformer evaluations per optimizer step and process for ``batch`` prompts,
    without and with gradient: ``{"nfe_no_grad": ..., "nfe_grad": ...}`` (an expectation where the recipe draws it).

    Optional: a method whose tensors live across steps (a rollout reused for several optimizer steps, an EMA "old"
    policy, a reference refreshed every K steps) defines ``state_dict() -> {name: tensor}`` and
    ``load_state_dict(state)``; the engine saves the state in every checkpoint (``method.safetensors``) and hands it
    back on ``--resume``, so a resumed run continues bit for bit.
    """

    def train_step(self, ctx: StepContext, backward: Backward) -> StepOutput: ...

    def nfe(self, batch: int) -> dict[str, float]: ...


def absolute_form(cfg) -> tuple[str, float]:
    """The held-out reward of a method that scores with ``reward.form`` and ``reward.relative_k``."""
    return cfg.reward.form, cfg.reward.relative_k


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: ``method: <name>`` selects it and ``<section>:`` holds its settings (``config``)."""

    name: str
    section: str
    config: type
    build: Callable  # (cfg, adapter, reward) -> Method
    summary: str
    # (form, k) of the reward the method optimises: what the held-out evaluation reports for its runs
    held_out_form: Callable = absolute_form


@dataclass
class BranchResult:
    """One differentiable pass of a step (an SRPO branch, a GRPO update, ...): its share of the loss, its mean
    reward and where it trained (sigma); ``extra`` holds pass-specific diagnostics."""

    name: str
    loss: float
    reward: float
    sigma_query: float
    sigma_target: float = 0.0
    k: float = 0.0
    extra: dict | None = None


def step_output(results: list[BranchResult], with_k: bool = False) -> StepOutput:
    """Sum the passes' losses, average their rewards, and report per pass name the mean reward, sigma, k and extras
    (``<name>_reward``, ``<name>_sigma``, with ``with_k`` ``<name>_k``, and ``<name>_<extra>``)."""
    groups: dict[str, list[BranchResult]] = defaultdict(list)
    for r in results:
        groups[r.name].append(r)
    metrics: dict[str, float] = {}
    for name, rs in groups.items():
        n = len(rs)
        metrics[f"{name}_reward"] = sum(r.reward for r in rs) / n
        metrics[f"{name}_sigma"] = sum(r.sigma_query for r in rs) / n
        if with_k:
            metrics[f"{name}_k"] = sum(r.k for r in rs) / n
        for key in (rs[0].extra or {}):
            metrics[f"{name}_{key}"] = sum(r.extra[key] for r in rs) / n
    return StepOutput(loss=sum(r.loss for r in results), reward=sum(r.reward for r in results) / len(results),
                      metrics=metrics)

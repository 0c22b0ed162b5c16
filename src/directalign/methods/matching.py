"""What the flow-matching-loss methods (Diffusion-DPO, AWM) share: the velocity error of the pretraining loss, group
rollouts of G samples per prompt, per-prompt advantages, the base-model reference and a snapshot of the trained
weights (a reference refreshed every K steps, an EMA of the policy) that survives checkpoint / resume.

Flow matching in diffusers' convention (sigma = 1 noise, sigma = 0 data): ``x_s = s * eps + (1 - s) * x0``, target
velocity ``eps - x0`` (flow_grpo ``scripts/train_sd3_dpo.py@ac4c86e``: ``target = noise - model_input``).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .. import flow
from ..engine import distributed as dist_utils
from .common import schedule, velocity_fn
from .sampling import rollout


# --------------------------------------------------------------------------------------------- pure functions
def flow_matching_mse(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared velocity error ``mean((v - (eps - x0))^2)`` over the non-batch elements, (B,) fp32."""
    err = (v.float() - (noise.float() - x0.float())) ** 2
    return err.reshape(err.shape[0], -1).mean(dim=1)


def logit_normal_train_sigmas(n: int, generator: torch.Generator, shift: float, mean: float = 0.0, std: float = 1.0,
                              levels: int = 1000) -> torch.Tensor:
    """Training sigmas (n,) as flow_grpo's DPO draws them (``train_sd3_dpo.py@ac4c86e``): ``u = sigmoid(N(mean,
    std^2))`` (:func:`directalign.flow.logit_normal_sigmas`, diffusers' ``compute_density_for_timestep_sampling
    ('logit_normal')``) indexes the ``levels``-step training schedule, ``i = floor(u * levels)``, whose sigma is
    ``shift(1 - i / levels)`` (``FlowMatchEulerDiscreteScheduler.sigmas[i]``). ``levels = 0``: continuous
    ``shift(1 - u)``. fp32 in (0, 1]."""
    u = flow.logit_normal_sigmas(n, generator, mean, std).double()
    t = 1 - (torch.floor(u * levels) / levels if levels > 0 else u)
    return flow.shift_sigmas(t, shift).float()


def per_prompt_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, global_std: bool = True
                          ) -> torch.Tensor:
    """flow_grpo's ``PerPromptStatTracker.update(type='grpo')`` (``flow_grpo/stat_tracking.py@ac4c86e``) on groups of
    ``group_size`` consecutive rewards: ``(r - mean_group) / (std + eps)`` with the population std of the whole batch
    (``global_std``, as ``sample.global_std=True``) or of the group. Shape of ``rewards``, fp32."""
    r = rewards.detach().double().reshape(-1, group_size)
    std = r.std(unbiased=False) if global_std else r.std(dim=1, unbiased=False, keepdim=True)
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).reshape(rewards.shape).float()


def best_and_worst(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of ``group_size`` consecutive rewards the row of its best and worst sample (flow_grpo's
    ``type='dpo'``: argmax / argmin; a group whose rewards are all equal gives winner 1, loser 0, as there).
    Returns two (groups,) long tensors of rows into ``rewards``."""
    r = rewards.detach().reshape(-1, group_size)
    best, worst = r.argmax(dim=1), r.argmin(dim=1)
    tie = best == worst
    best, worst = torch.where(tie, torch.ones_like(best), best), torch.where(tie, torch.zeros_like(worst), worst)
    base = torch.arange(r.shape[0], device=r.device) * group_size
    return base + best, base + worst


# --------------------------------------------------------------------------------------------- references
class BaseReference:
    """The base model: the transformer with its LoRA adapters disabled, or (full fine-tuning) a frozen copy made at
    build time, before fine-tuning starts or a checkpoint loads (a second transformer in memory)."""

    def __init__(self, adapter, full: bool):
        self.adapter = adapter
        self.copy = copy.deepcopy(adapter.transformer).requires_grad_(False).eval() if full else None

    @contextlib.contextmanager
    def active(self):
        """Within the block the adapter's transformer is the base model."""
        if self.copy is not None:
            pipe, slot = self.adapter.pipe, getattr(self.adapter, "transformer_slot", "transformer")
            trained = getattr(pipe, slot)
            setattr(pipe, slot, self.copy)
            try:
                yield
            finally:
                setattr(pipe, slot, trained)
        else:
            self.adapter.transformer.disable_adapters()
            try:
                yield
            finally:
                self.adapter.transformer.enable_adapters()


class WeightSnapshot:
    """A copy of the trainable weights (LoRA or the whole transformer) taken at some step: the policy it holds
    runs inside :meth:`swapped`. Its tensors are a method's state across steps (``state_dict`` with ``prefix``),
    saved in every checkpoint as ``method.safetensors`` so a resumed run uses the same snapshot.

    :meth:`swapped` copies the snapshot into the live parameters and back: use it under ``torch.no_grad`` and before
    the differentiable pass of a step (an in-place change of a parameter a pending backward saved is an error)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.weights: dict[str, torch.Tensor] = {}

    @staticmethod
    def _named(transformer) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]

    def __bool__(self) -> bool:
        return bool(self.weights)

    @torch.no_grad()
    def capture(self, transformer) -> None:
        self.weights = {n: p.detach().clone() for n, p in self._named(transformer)}

    @torch.no_grad()
    def lerp(self, transformer, decay: float) -> None:
        """``snapshot <- decay * snapshot + (1 - decay) * weights`` (AWM's KL-EMA update)."""
        for n, p in self._named(transformer):
            self.weights[n].mul_(decay).add_(p.detach(), alpha=1 - decay)

    @contextlib.contextmanager
    def swapped(self, transformer):
        named = self._named(transformer)
        with torch.no_grad():
            live = {n: p.detach().clone() for n, p in named}
            for n, p in named:
                p.copy_(self.weights[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in named:
                    p.copy_(live[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{self.prefix}.{n}": dist_utils.full_tensor(t) for n, t in self.weights.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], transformer) -> None:
        mine = {k[len(self.prefix) + 1:]: v for k, v in state.items() if k.startswith(self.prefix + ".")}
        if mine:
            params = dict(self._named(transformer))
            self.weights = {n: dist_utils.like_param(v, params[n]) for n, v in mine.items()}


# --------------------------------------------------------------------------------------------- group rollouts
def group_noise(adapter, base_noise: torch.Tensor, group_size: int, same: bool, height: int, width: int,
                generator: torch.Generator) -> torch.Tensor:
    """(B * G, ...) prompt-major initial noise: sample 0 of each group is the step's noise row of its prompt; the
    others repeat it (``same``) or draw their own from ``generator``."""
    rows = base_noise.repeat_interleave(group_size, dim=0)
    if same or group_size == 1:
        return rows
    b = base_noise.shape[0]
    extra = adapter.noise(b * (group_size - 1), height, width, generator).to(base_noise)
    extra = extra.reshape(b, group_size - 1, *base_noise.shape[1:])
    return torch.cat([base_noise[:, None], extra], dim=1).reshape(rows.shape)


@torch.no_grad()
def sample_group(adapter, embeds, noise: torch.Tensor, steps: int, shift: float, guidance: float | None,
                 height: int, width: int, sampler: str, eta: float, generator: torch.Generator) -> torch.Tensor:
    """Clean latents from ``noise`` (no gradient): the Euler ODE (``sampler='ode'``) or Flow-GRPO's SDE
    (``'sde'``: :func:`directalign.methods.grpo.sde_step` with ``g = eta * sqrt(s / (1 - s))`` on every step, the
    last one to sigma = 0 included, as flow_grpo's ``pipeline_with_logprob`` / ``sde_step_with_logprob``
    @ac4c86e do)."""
    if sampler == "ode":
        return rollout(adapter, embeds, noise, steps, shift, guidance, height, width)
    from .grpo_math import sde_step  # the SDE transition GRPO trains on

    sig = schedule(steps, shift)
    inner = velocity_fn(adapter, embeds, guidance, height, width)
    x = noise.float()
    for i in range(steps):
        s = torch.full((x.shape[0],), float(sig[i]))
        v = inner(x.to(adapter.dtype), s.to(x.device, adapter.dtype))
        mean, std = sde_step(x, v, float(sig[i]), float(sig[i + 1]), eta, "flow", float(sig[1]))
        x = mean + std * torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return x.to(noise.dtype)


def train_velocity(adapter, embeds, guidance: float | None, height: int, width: int):
    """``(x fp32, sigma (B,)) -> v fp32`` through the adapter (the model computes in its own dtype)."""
    inner = velocity_fn(adapter, embeds, guidance, height, width)
    dtype = adapter.dtype

    def velocity(x, sigma):
        return inner(x.to(dtype), sigma.to(x.device, dtype)).float()

    return velocity


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """The share of groups whose rewards are all equal (no preference, no advantage)."""
    r = rewards.detach().reshape(-1, group_size)
    return float((r.std(dim=1, unbiased=False) == 0).float().mean())

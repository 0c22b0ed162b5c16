"""The loop ReNO (:mod:`directalign.steer.reno`) and DNO (:mod:`directalign.steer.dno`) share: optimise noise
tensors by gradient through a frozen generator and reward, keep each slot's best iterate."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .base import SteerError


@contextmanager
def frozen(*modules):
    """Switch ``requires_grad`` off on every parameter of ``modules`` for the block (restored afterwards), so
    gradients reach only the optimised noise."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, b in zip(params, before):
            p.requires_grad_(b)


def clip_slots(leaves: list[torch.Tensor], max_norm: float) -> None:
    """Scale each slot's gradient, taken over all ``leaves`` (each (B, ...) with the slot on dim 0) jointly, down to
    norm at most ``max_norm`` (nothing when 0)."""
    if max_norm <= 0:
        return
    sq = sum(leaf.grad.float().flatten(1).pow(2).sum(1) for leaf in leaves)
    scale = (max_norm / sq.sqrt().clamp_min(1e-12)).clamp(max=1.0)
    for leaf in leaves:
        leaf.grad.mul_(scale.view(-1, *([1] * (leaf.ndim - 1))).to(leaf.grad))


@dataclass
class Optimised:
    images: torch.Tensor  # (B, 3, H, W) of the best iterate per slot
    rewards: torch.Tensor  # (B,)
    leaves: list[torch.Tensor]  # the optimised tensors at each slot's best iterate
    best_iteration: torch.Tensor  # (B,) long
    start_rewards: torch.Tensor  # (B,) iteration 0 (the unoptimised noise)
    reward_calls: int


def optimise_noise(score_fn, prompts, leaves: list[torch.Tensor], generate, objective, optimizer,
                   iterations: int, grad_clip: float) -> Optimised:
    """The loop ReNO and DNO share, on one batch of slots: ``generate(leaves) -> images`` (B, 3, H, W),
    ``objective(leaves, rewards) -> loss`` (B,) to minimise; ``iterations`` optimizer steps, ``iterations + 1``
    images (the last scored without gradient), each slot's gradient clipped on its own (:func:`clip_slots`); the
    best iterate per slot is kept (ties keep the earlier)."""
    best = None
    for it in range(iterations + 1):
        last = it == iterations
        with torch.set_grad_enabled(not last):
            images = generate(leaves)
            r = score_fn(images, prompts).float()
        r_cpu, img = r.detach().cpu(), images.detach().float().cpu()
        snap = [leaf.detach().clone() for leaf in leaves]
        if best is None:
            best = Optimised(img, r_cpu.clone(), snap, torch.zeros(len(prompts), dtype=torch.long), r_cpu.clone(),
                             (iterations + 1) * len(prompts))
        else:
            win = r_cpu > best.rewards
            best.images[win], best.rewards[win], best.best_iteration[win] = img[win], r_cpu[win], it
            for kept, now in zip(best.leaves, snap):
                kept[win.to(kept.device)] = now[win.to(now.device)]
        if last:
            break
        if not r.requires_grad:
            raise SteerError("the steering reward gave no gradient to the noise (it is not differentiable); steer "
                             "with best-of-n, noise-search or fk instead")
        optimizer.zero_grad(set_to_none=True)
        objective(leaves, r).sum().backward()
        clip_slots(leaves, grad_clip)
        optimizer.step()
    return best



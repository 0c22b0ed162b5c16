"""What every stage of the world build shares: the build log, progress lines, the learning-rate schedule and the
EMA update. ``directalign.world.build`` runs the stages and writes ``LOG`` to ``build_log.json``."""

from __future__ import annotations

import math

import torch

LOG: dict = {}


def _log(stage: str, **values) -> None:
    msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"[{stage}] {msg}", flush=True)


def _cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


"""Reuse of one online rollout for several optimizer steps (``srpo.rollout_reuse``).

Direct-Align needs only the pair (x0, noise) of a rollout: each step draws its own window position and injects the
noise into x0 at that position (arXiv 2509.06942, eq. 6-8). The rollout's ``rollout_steps`` forwards without
gradient are most of an SRPO step's model evaluations, so feeding R steps from one rollout divides them by R. The
trade is staleness: the x0 of steps 2..R comes from the weights of the rollout's step, a few updates old, as
PPO-style methods reuse a rollout for several updates (Flow-GRPO's gradient accumulation over one rollout epoch).

The buffer is a method state (``state_dict`` / ``load_state_dict``), so a run resumed between two rollouts reuses
exactly the x0 it would have reused without the interruption. Under torch distributed each rank keeps its own rows;
the checkpoint holds every rank's (gathered), and each rank takes its own back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import TrainingError
from .common import decode_texts, encode_texts


@dataclass
class Rollout:
    """One rollout of this rank: its prompts, clean latents ``x0`` and the noise it started from (same shape)."""

    step: int
    prompts: list[str]
    x0: torch.Tensor
    noise: torch.Tensor


def is_rollout_step(step: int, reuse: int) -> bool:
    """A new rollout is made at steps 0, R, 2R, ... (R = ``reuse``); steps in between reuse the last one."""
    return step % reuse == 0


class RolloutBuffer:
    """Holds the last rollout of this rank and decides, per step, whether a new one is needed."""

    def __init__(self, reuse: int):
        self.reuse = reuse
        self.last: Rollout | None = None

    def get(self, step: int) -> Rollout | None:
        """The rollout step ``step`` reuses, or None when it must make a new one (a rollout step, or no rollout of
        the current period is held)."""
        if self.reuse <= 1 or is_rollout_step(step, self.reuse) or self.last is None:
            return None
        if self.last.step != step - step % self.reuse:
            return None  # a stale rollout of an earlier period (never used: it would break exact resume)
        return self.last

    def put(self, rollout: Rollout) -> None:
        if self.reuse > 1:
            self.last = Rollout(rollout.step, list(rollout.prompts), rollout.x0.detach(), rollout.noise.detach())

    # -------------------------------------------------------------------------------------- method state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank's held rollout as ``rollout.rank{r}.{step,prompts,x0,noise}`` (gathered over ranks: every rank
        calls this when a checkpoint is written), ``{}`` when nothing is held."""
        local = {} if self.last is None else {
            "step": torch.tensor([self.last.step]), "prompts": encode_texts(self.last.prompts),
            "x0": self.last.x0.detach().cpu(), "noise": self.last.noise.detach().cpu()}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        return {f"rollout.rank{r}.{k}": v for r, part in enumerate(gathered) for k, v in part.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], rank: int, device: torch.device) -> None:
        """Take this rank's rollout back from a checkpoint's state (nothing held when it holds none)."""
        prefix = f"rollout.rank{rank}."
        mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not mine:
            if any(k.startswith("rollout.rank") for k in state):
                raise TrainingError(f"--resume: the checkpoint holds no reused rollout for rank {rank} (it was "
                                    "written with fewer processes); resume with the same number of processes")
            self.last = None
            return
        self.last = Rollout(int(mine["step"][0]), decode_texts(mine["prompts"]), mine["x0"].to(device),
                            mine["noise"].to(device))

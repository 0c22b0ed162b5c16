"""What one optimizer step of any method is given: its step index, this rank's prompts and seeded generators.

Every random draw of step ``t`` comes from a generator seeded with ``(seed, rank, t, stream)``, and the prompt order
is a pure function of ``(seed, epoch)``, so a run resumed at step k replays exactly what an uninterrupted run does,
and a run on W processes with batch b sees the draws of one process with batch W * b wherever a method takes this
rank's rows of a global-batch draw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

# Seed streams of one step (fixed numbers: changing one changes every run's trajectory).
STREAM_STEP = 0  # a method's own draws (SRPO: the window position)
STREAM_PYTHON = 1  # Python's random (control-word selection)
STREAM_TORCH_GLOBAL = 2  # torch's global generator (dropout inside LoRA, if any)
STREAM_NOISE = 3  # the global batch's noise
STREAM_EPOCH = 7  # prompt order of an epoch


def seed_for(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for (seed, rank, step, stream)."""
    x = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB + stream * 0x2545F491)
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 32
    return x & ((1 << 63) - 1)


class PromptSampler:
    """Batch ``step`` of rank ``rank``: epochs are seeded permutations (or the file order), sharded by rank.

    ``items`` may be prompts or indices (SRPO's offline mode samples image indices the same way).
    """

    def __init__(self, items: list, batch_size: int, seed: int, shuffle: bool, rank: int = 0,
                 world_size: int = 1):
        self.prompts, self.batch_size, self.seed, self.shuffle = items, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size

    def _order(self, epoch: int) -> list[int]:
        n = len(self.prompts)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(seed_for(self.seed, 0, epoch, stream=STREAM_EPOCH))
        return torch.randperm(n, generator=g).tolist()

    def position(self, step: int, slot: int) -> tuple[int, int]:
        """(epoch, index in the epoch's order) of the ``slot``-th prompt of ``step`` for this rank."""
        flat = (step * self.world_size + self.rank) * self.batch_size + slot
        return divmod(flat, len(self.prompts))

    def batch(self, step: int) -> list:
        out = []
        for slot in range(self.batch_size):
            epoch, i = self.position(step, slot)
            out.append(self.prompts[self._order(epoch)[i]])
        return out


@dataclass
class StepContext:
    """One optimizer step as a method sees it.

    ``prompts`` are this rank's ``batch_size`` prompts; rows ``rows`` of a draw for the global batch
    (``world_size * batch_size``) belong to this rank.
    """

    step: int
    prompts: list[str]
    seed: int
    rank: int = 0
    world_size: int = 1
    batch_size: int = 1

    def generator(self, stream: int = STREAM_STEP, shared: bool = False) -> torch.Generator:
        """A CPU generator for ``stream`` of this step: this rank's own, or (``shared``) the same on every rank."""
        return torch.Generator().manual_seed(seed_for(self.seed, 0 if shared else self.rank, self.step, stream))

    def python_rng(self) -> random.Random:
        """Python's random for this step, the same on every rank."""
        return random.Random(seed_for(self.seed, 0, self.step, stream=STREAM_PYTHON))

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def rows(self) -> slice:
        return slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)


@dataclass
class StepOutput:
    """What a method's step returns: its loss and reward (means over this rank's samples, as floats) and its own
    metrics (``{name: float}``), which reach ``metrics.jsonl`` and the report averaged over ranks."""

    loss: float
    reward: float
    metrics: dict[str, float] = field(default_factory=dict)

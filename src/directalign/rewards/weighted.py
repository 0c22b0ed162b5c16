"""A weighted sum of rewards with explicit per-reward normalisation:

    r(img, text) = sum_i  w_i * (s_i(img, text) - mean_i) / std_i

Nothing is estimated behind the user's back: ``mean_i`` and ``std_i`` are fixed numbers from the config (``0`` and
``1``, i.e. no normalisation, unless given), and each term's raw and normalised scores are returned by
:meth:`WeightedSumReward.components` and kept, detached, in ``last_components`` after every scoring call so a
trainer can log them (:meth:`step_metrics`, keys ``reward_term_<name>``). :meth:`describe` states the whole formula
in one line.

SRPO's relative forms are linear combinations of scores, so they apply to the sum term by term:
``(1 + k) r(pos) - r(neg) = sum_i w_i [(1 + k) s_i(pos) - s_i(neg)] / std_i - k sum_i w_i mean_i / std_i``.
Text-conditioned terms get their full semantic-relative signal. An image-only term (``s(pos) = s(neg)``)
contributes ``k * w * s / std`` in the ``official`` form, nothing in ``relative`` and ``w * s / std`` in ``paper``:
the same as SRPO applied to that reward alone. The sum is text-conditioned when any term is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Reward


@dataclass
class Term:
    name: str
    weight: float = 1.0
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"reward term {self.name}: std must be > 0, got {self.std}")


class WeightedSumReward(Reward):
    name = "sum"

    def __init__(self, rewards: list[Reward], terms: list[Term]):
        super().__init__()
        if not rewards or len(rewards) != len(terms):
            raise ValueError(f"a weighted sum needs one term per reward, got {len(rewards)} rewards and "
                             f"{len(terms)} terms")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward term names must be unique, got {names}")
        self.rewards = nn.ModuleList(rewards)
        self.terms = list(terms)
        self.text_conditioned = any(r.text_conditioned for r in rewards)
        self.last_components: dict[str, float] = {}
        self.freeze()

    def describe(self) -> str:
        parts = [f"{t.weight:g} * ({t.name} - {t.mean:g}) / {t.std:g}" for t in self.terms]
        return "reward = " + " + ".join(parts)

    def step_metrics(self) -> dict[str, float]:
        """``reward_term_<name>`` (raw) and ``reward_term_<name>/normalized`` means of the last scoring call."""
        return {f"reward_term_{k}": v for k, v in self.last_components.items()}

    def encode_images(self, images: torch.Tensor) -> list:
        return [r.encode_images(images) for r in self.rewards]

    def components(self, image_state: list, texts: list[str]) -> dict[str, torch.Tensor]:
        """Per term: ``<name>`` the raw score (B,), ``<name>/normalized`` ``(raw - mean) / std`` (B,)."""
        out = {}
        for reward, term, state in zip(self.rewards, self.terms, image_state):
            raw = reward.score_texts(state, texts)
            out[term.name] = raw
            out[f"{term.name}/normalized"] = (raw - term.mean) / term.std
        return out

    def score_texts(self, image_state: list, texts: list[str]) -> torch.Tensor:
        comps = self.components(image_state, texts)
        total = sum(t.weight * comps[f"{t.name}/normalized"].float() for t in self.terms)
        self.last_components = {k: float(v.detach().float().mean()) for k, v in comps.items()}
        return total

    def forward_with_components(self, images: torch.Tensor, prompts: list[str]):
        """(total (B,), components dict) for one set of images and prompts."""
        state = self.encode_images(images)
        comps = self.components(state, prompts)
        total = sum(t.weight * comps[f"{t.name}/normalized"].float() for t in self.terms)
        return total, comps

"""SRPO's semantic relative reward, a thin layer over any text-conditioned reward.

Control words enter the reward's text only, as ``"<word>. <prompt>"``; the generator keeps the original prompt.
For a CLIP-type reward ``s(img, text) = f_img . C_text`` is linear in the text embedding, so every form below is the
same linear combination of scores as the paper writes for embeddings:

* ``official``  ``(1 + k) s(pos) - s(neg)``   (official FLUX code; its comment calls the paper's form less stable)
* ``paper``     ``(1 - k) s(neg) + k s(pos)``  (paper Eq. 10 as written)
* ``relative``  ``s(pos) - s(neg)``             (pure relative, k ignored; the Qwen code's k = 0)
* ``absolute``  ``s(prompt)``                   (plain Direct-Align, no control words)

``(1 + k) pos - neg = (pos - neg) + k pos``: the relative term always has weight 1 and k adds a dose of the
absolute reward with the positive phrase.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .base import Reward
from .video import is_video, video_reward

REWARD_FORMS = ("official", "paper", "relative", "absolute")
SELECTIONS = ("round_robin", "random")

# Official FLUX code, tuned for HPSv2.1 (srpo-method-notes section 2.4).
HPS_POSITIVE_WORDS = ("Natural-lighting", "Detail", "Detailed", "Real")
HPS_NEGATIVE_WORDS = ("Concept art", "Painting", "Anime", "Flat", "Oil")
# The tiny world's reward knows its style words; the default targets the texture attribute.
TINY_POSITIVE_WORDS = ("textured",)
TINY_NEGATIVE_WORDS = ("flat",)


def control_prompt(word: str, prompt: str) -> str:
    """``"<word>. <prompt>"``, the official way of attaching a control word to the reward's text."""
    return f"{word}. {prompt}"


def combine(score_pos: torch.Tensor, score_neg: torch.Tensor, k: float | torch.Tensor, form: str) -> torch.Tensor:
    """Combine positive-phrase and negative-phrase scores (B,) into the SRPO reward (B,) for a relative form."""
    if form == "official":
        return (1 + k) * score_pos - score_neg
    if form == "paper":
        return (1 - k) * score_neg + k * score_pos
    if form == "relative":
        return score_pos - score_neg
    raise ValueError(f"unknown relative reward form {form!r}; choose from {REWARD_FORMS[:3]} (or 'absolute')")


@dataclass
class ControlWords:
    """Positive and negative control-word lists and how one pair is chosen per step."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]
    selection: str = "round_robin"

    def __post_init__(self) -> None:
        if not self.positive or not self.negative:
            raise ValueError("control words: both the positive and the negative list need at least one word")
        if self.selection not in SELECTIONS:
            raise ValueError(f"control word selection {self.selection!r}; choose from {SELECTIONS}")

    def pick(self, step: int, rng: random.Random | None = None) -> tuple[str, str]:
        """Round-robin on the step index (official: ``POS[step % 4]``, ``NEG[step % 5]``) or a seeded random draw."""
        if self.selection == "round_robin":
            return self.positive[step % len(self.positive)], self.negative[step % len(self.negative)]
        if rng is None:
            raise ValueError("random control-word selection needs an rng")
        return rng.choice(self.positive), rng.choice(self.negative)


def semantic_relative_reward(reward: Reward, images: torch.Tensor, prompts: list[str], form: str,
                             k: float | torch.Tensor = 0.0, positive: str | None = None,
                             negative: str | None = None, swap: bool = False) -> torch.Tensor:
    """The SRPO reward of decoded images (B,) for prompts, differentiable through the images.

    ``swap=True`` exchanges the roles of the positive and negative words (the inversion branch scores
    ``(1 + k) s(neg) - s(pos)``). The image tower runs once for both phrases. Videos (B, F, 3, H, W) score every
    frame and average per video (:mod:`directalign.rewards.video`).
    """
    if is_video(images):
        kf = k.repeat_interleave(images.shape[1]) if torch.is_tensor(k) and k.ndim else k  # per-video k -> frames
        return video_reward(lambda x, p: semantic_relative_reward(reward, x, p, form, kf, positive, negative, swap),
                            images, prompts)
    state = reward.encode_images(images)
    if form == "absolute":
        return reward.score_texts(state, prompts)
    if not reward.text_conditioned:
        raise ValueError(f"the {form!r} SRPO form needs a text-conditioned reward; {reward.name} is image-only "
                         f"(use reward_form=absolute)")
    if positive is None or negative is None:
        raise ValueError("relative reward forms need a positive and a negative control word")
    pos = reward.score_texts(state, [control_prompt(positive, p) for p in prompts])
    neg = reward.score_texts(state, [control_prompt(negative, p) for p in prompts])
    if swap:
        pos, neg = neg, pos
    return combine(pos, neg, k, form)

"""Held-out evaluation of a generator under the reward a run optimises, plus the tiny world's analytic judge.

"Reward" here is the training reward evaluated on held-out prompts and fixed seeds: for SRPO the relative form with
the run's control words (averaged over every positive x negative pair; SRPO: k = the mean of ``discount_pos`` in the
official and paper forms, 0 in the multiplicative mode; other methods: ``reward.relative_k``), for plain
Direct-Align the absolute score. Training calls :func:`evaluate` before and after a run (``reward_before`` /
``reward_after`` of ``summary.json``); ``directalign eval`` calls it too, so it reproduces those numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..methods.registry import METHODS
from ..methods.sampling import generate
from ..rewards.relative import combine, control_prompt
from ..rewards.video import is_video, video_reward


@dataclass
class EvalResult:
    reward: float
    rewards: torch.Tensor  # (N,) per image
    images: torch.Tensor  # (N, 3, H, W)
    prompts: list[str]
    seeds: list[int]
    judge: dict | None


def held_out_form(cfg) -> tuple[str, float]:
    """(form, k) of the run's held-out reward: what its method optimises (see each MethodSpec's held_out_form)."""
    return METHODS[cfg.method].held_out_form(cfg)


def differentiable_training_reward(reward, images: torch.Tensor, prompts: list[str], cfg) -> torch.Tensor:
    """The run's reward of each image (N,), as defined in the module docstring, differentiable in ``images`` (the
    score the gradient-based steerers ascend); videos (N, F, 3, H, W) score every frame and average
    (:mod:`directalign.rewards.video`)."""
    if is_video(images):
        return video_reward(lambda x, p: differentiable_training_reward(reward, x, p, cfg), images, prompts)
    state = reward.encode_images(images)
    form, k = held_out_form(cfg)
    if form == "absolute":
        return reward.score_texts(state, prompts).float().cpu()
    total = torch.zeros(len(prompts))
    pairs = [(p, n) for p in cfg.reward.positive_words for n in cfg.reward.negative_words]
    for pos_word, neg_word in pairs:
        pos = reward.score_texts(state, [control_prompt(pos_word, p) for p in prompts])
        neg = reward.score_texts(state, [control_prompt(neg_word, p) for p in prompts])
        total += combine(pos, neg, k, form).float().cpu()
    return total / len(pairs)


@torch.no_grad()
def training_reward(reward, images: torch.Tensor, prompts: list[str], cfg) -> torch.Tensor:
    """The run's reward of each image (N,), as defined in the module docstring (no gradient)."""
    return differentiable_training_reward(reward, images, prompts, cfg)


def score_in_chunks(reward, images, prompts, cfg, chunk: int = 256, progress=None) -> torch.Tensor:
    """:func:`training_reward` of many images, ``chunk`` at a time (N,); ``progress`` (a tqdm bar or None) advances
    by each chunk's images."""
    out = []
    for i in range(0, len(prompts), chunk):
        out.append(training_reward(reward, images[i : i + chunk], prompts[i : i + chunk], cfg))
        if progress is not None:
            progress.update(len(out[-1]))
    return torch.cat(out)


def eval_slots(prompts: list[str], seeds: list[int]) -> tuple[list[str], list[int]]:
    """Every (prompt, seed) pair, prompt-major."""
    return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]


def sampling_steps(n_images: int, cfg) -> int:
    """How many sampling steps :func:`generate_slots` takes for ``n_images`` (the span of its progress bar)."""
    return math.ceil(n_images / cfg.eval.batch_size) * cfg.eval.steps


def generate_slots(adapter, prompts: list[str], seeds: list[int], cfg, progress=None) -> torch.Tensor:
    """:func:`directalign.methods.sampling.generate` of every (prompt, seed) slot with ``cfg.eval``'s settings;
    ``progress`` (a tqdm bar, or None) advances by one per sampling step of each batch."""
    e, m = cfg.eval, cfg.model
    on_step = None if progress is None else (lambda: progress.update(1))
    return generate(adapter, prompts, seeds, e.steps, cfg.sampling.shift, e.guidance, m.height, m.width,
                    e.batch_size, on_step=on_step)


def evaluate(adapter, reward, cfg, prompts: list[str], judge_world: bool, desc: str = "held-out eval",
             progress: bool | None = None) -> EvalResult:
    """Generate every (prompt, seed) slot of ``cfg.eval`` and score it with the run's reward (plus the tiny world's
    judge rates when ``judge_world``), with a progress bar (``desc``) unless ``progress`` (default
    ``cfg.run.progress``) is false."""
    from ..progress import bar

    slot_prompts, slot_seeds = eval_slots(prompts, cfg.eval.seeds)
    show = cfg.run.progress if progress is None else progress
    n = len(slot_prompts)
    with bar(sampling_steps(n, cfg), desc, show, unit="step", postfix=f"{n} images") as b:
        images = generate_slots(adapter, slot_prompts, slot_seeds, cfg, b)
        rewards = score_in_chunks(reward, images, slot_prompts, cfg)
    judge = None
    if judge_world:
        from ..world.judge import attribute_rates

        judge = attribute_rates(images, slot_prompts)
    return EvalResult(float(rewards.mean()), rewards, images, slot_prompts, slot_seeds, judge)


def best_of_n(adapter, reward, cfg, prompts: list[str], n: int, progress: bool | None = None) -> float:
    """Mean over (prompt, seed) slots of the best reward among n samples; sample 0 uses the slot's own seed. A
    progress bar over the sampling steps of all n rounds unless ``progress`` (default ``cfg.run.progress``) is
    false."""
    from ..progress import bar

    slot_prompts, slot_seeds = eval_slots(prompts, cfg.eval.seeds)
    show = cfg.run.progress if progress is None else progress
    best = None
    with bar(n * sampling_steps(len(slot_prompts), cfg), f"best-of-{n}", show, unit="step",
             postfix=f"{n} x {len(slot_prompts)} images") as b:
        for j in range(n):
            seeds = [s + 100_003 * j for s in slot_seeds]
            images = generate_slots(adapter, slot_prompts, seeds, cfg, b)
            r = score_in_chunks(reward, images, slot_prompts, cfg)
            best = r if best is None else torch.maximum(best, r)
    return float(best.mean())

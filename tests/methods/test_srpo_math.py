"""SRPO's reward arithmetic against hand-computed tensors (rewards.relative, methods.losses)."""

from __future__ import annotations

import random

import pytest
import torch

from directalign.methods.losses import reward_loss
from directalign.rewards.base import Reward
from directalign.rewards.relative import (
    HPS_NEGATIVE_WORDS,
    HPS_POSITIVE_WORDS,
    ControlWords,
    combine,
    control_prompt,
    semantic_relative_reward,
)

# ------------------------------------------------------------------------------------------------ a fake reward
# score(image, text) = mean(image) * WEIGHTS[first word of text]: hand-computable, differentiable in the image.
WEIGHTS = {"good.": 2.0, "bad.": -1.0, "plain": 0.5}


class FakeReward(Reward):
    name = "fake"

    def __init__(self, text_conditioned: bool = True):
        super().__init__()
        self.text_conditioned = text_conditioned
        self.texts: list[list[str]] = []
        self.image_calls = 0

    def encode_images(self, images):
        self.image_calls += 1
        return images.flatten(1).mean(1)

    def score_texts(self, state, texts):
        self.texts.append(list(texts))
        w = torch.tensor([WEIGHTS[t.split(" ")[0]] for t in texts], dtype=state.dtype)
        return state * w


def _images():
    # image means 0.25 and 0.75
    a = torch.full((1, 3, 2, 2), 0.25)
    b = torch.tensor([0.5, 1.0]).repeat(6).reshape(1, 3, 2, 2)
    return torch.cat([a, b]).requires_grad_(True)


PROMPTS = ["plain cat", "plain dog"]

# ------------------------------------------------------------------------------------------------ combine
POS = torch.tensor([0.30, -0.10, 0.50], dtype=torch.float64)
NEG = torch.tensor([0.20, 0.40, -0.25], dtype=torch.float64)


def test_combine_official_hand_values():
    out = combine(POS, NEG, 0.1, "official")
    # 1.1*0.3-0.2 = 0.13; 1.1*(-0.1)-0.4 = -0.51; 1.1*0.5+0.25 = 0.80
    torch.testing.assert_close(out, torch.tensor([0.13, -0.51, 0.80], dtype=torch.float64))


def test_combine_paper_hand_values():
    out = combine(POS, NEG, 0.25, "paper")
    # 0.75*neg + 0.25*pos: 0.15+0.075 = 0.225; 0.3-0.025 = 0.275; -0.1875+0.125 = -0.0625
    torch.testing.assert_close(out, torch.tensor([0.225, 0.275, -0.0625], dtype=torch.float64))


def test_combine_relative_ignores_k():
    expected = torch.tensor([0.10, -0.50, 0.75], dtype=torch.float64)
    for k in (0.0, 0.3, 7.0):
        torch.testing.assert_close(combine(POS, NEG, k, "relative"), expected)


@pytest.mark.parametrize("k", [0.0, 0.01, 0.1, 0.25, 0.3, -0.1, 2.0])
def test_official_form_is_relative_plus_k_absolute(k):
    """(1 + k) pos - neg = (pos - neg) + k * pos: the relative term always has weight 1."""
    lhs = combine(POS, NEG, k, "official")
    torch.testing.assert_close(lhs, combine(POS, NEG, k, "relative") + k * POS)
    torch.testing.assert_close(lhs, (POS - NEG) + k * POS)


def test_combine_k_zero_official_equals_relative_and_paper_extremes():
    torch.testing.assert_close(combine(POS, NEG, 0.0, "official"), POS - NEG)
    torch.testing.assert_close(combine(POS, NEG, 1.0, "paper"), POS)
    torch.testing.assert_close(combine(POS, NEG, 0.0, "paper"), NEG)


def test_combine_accepts_per_sample_k():
    k = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(combine(POS, NEG, k, "official"),
                               torch.tensor([0.10, -0.55, 1.25], dtype=torch.float64))


@pytest.mark.parametrize("form", ["absolute", "bogus", ""])
def test_combine_rejects_non_relative_forms(form):
    with pytest.raises(ValueError, match="official"):
        combine(POS, NEG, 0.1, form)


# ------------------------------------------------------------------------------------------------ semantic reward
def test_control_prompt_format():
    assert control_prompt("Real", "a cat") == "Real. a cat"
    assert control_prompt("Concept art", "x") == "Concept art. x"


def test_semantic_relative_reward_official_values_and_texts():
    rw = FakeReward()
    images = _images()
    r = semantic_relative_reward(rw, images, PROMPTS, "official", 0.2, "good", "bad")
    # pos score = 2*m, neg score = -1*m; official: 1.2*2m + m = 3.4 m with m = (0.25, 0.75)
    torch.testing.assert_close(r, torch.tensor([0.85, 2.55]))
    # control prompts reach the reward's text, exactly "<word>. <prompt>", in prompt order
    assert rw.texts == [["good. plain cat", "good. plain dog"], ["bad. plain cat", "bad. plain dog"]]
    assert rw.image_calls == 1  # the image tower runs once for both phrases
    r.sum().backward()
    # d/d(pixel) of 3.4 * mean(image) = 3.4 / 12
    torch.testing.assert_close(images.grad, torch.full_like(images, 3.4 / 12))


def test_semantic_relative_reward_swap_exchanges_roles():
    rw = FakeReward()
    images = _images()
    r = semantic_relative_reward(rw, images, PROMPTS, "official", 0.2, "good", "bad", swap=True)
    # (1 + k) s(neg) - s(pos) = 1.2 * (-m) - 2m = -3.2 m
    torch.testing.assert_close(r, torch.tensor([-0.8, -2.4]))
    # the words are attached to the same texts; only their roles in the combination change
    assert sorted(map(tuple, rw.texts)) == [("bad. plain cat", "bad. plain dog"),
                                             ("good. plain cat", "good. plain dog")]


def test_semantic_relative_reward_paper_and_relative_forms():
    images = _images()
    m = torch.tensor([0.25, 0.75])
    paper = semantic_relative_reward(FakeReward(), images, PROMPTS, "paper", 0.25, "good", "bad")
    torch.testing.assert_close(paper, 0.75 * (-m) + 0.25 * (2 * m))
    rel = semantic_relative_reward(FakeReward(), images, PROMPTS, "relative", 0.9, "good", "bad")
    torch.testing.assert_close(rel, 3 * m)
    rel_swapped = semantic_relative_reward(FakeReward(), images, PROMPTS, "relative", 0.9, "good", "bad", swap=True)
    torch.testing.assert_close(rel_swapped, -3 * m)


def test_absolute_form_uses_the_plain_prompt():
    rw = FakeReward()
    r = semantic_relative_reward(rw, _images(), PROMPTS, "absolute", 0.3, "good", "bad")
    torch.testing.assert_close(r, torch.tensor([0.125, 0.375]))  # 0.5 * m, k ignored
    assert rw.texts == [PROMPTS]


def test_absolute_form_works_for_image_only_reward():
    rw = FakeReward(text_conditioned=False)
    r = semantic_relative_reward(rw, _images(), PROMPTS, "absolute")
    torch.testing.assert_close(r, torch.tensor([0.125, 0.375]))


@pytest.mark.parametrize("form", ["official", "paper", "relative"])
def test_image_only_reward_refuses_relative_forms(form):
    rw = FakeReward(text_conditioned=False)
    with pytest.raises(ValueError, match="image-only"):
        semantic_relative_reward(rw, _images(), PROMPTS, form, 0.1, "good", "bad")
    assert rw.texts == []


def test_relative_form_needs_both_words():
    with pytest.raises(ValueError, match="control word"):
        semantic_relative_reward(FakeReward(), _images(), PROMPTS, "official", 0.1, "good", None)


# ------------------------------------------------------------------------------------------------ control words
def test_round_robin_equals_official_indexing():
    cw = ControlWords(HPS_POSITIVE_WORDS, HPS_NEGATIVE_WORDS, "round_robin")
    pos = ["Natural-lighting", "Detail", "Detailed", "Real"]
    neg = ["Concept art", "Painting", "Anime", "Flat", "Oil"]
    for step in range(60):
        assert cw.pick(step) == (pos[step % 4], neg[step % 5])
    # the pair sequence has period lcm(4, 5) = 20 and visits all 20 pairs
    pairs = [cw.pick(s) for s in range(20)]
    assert len(set(pairs)) == 20
    assert [cw.pick(s) for s in range(20, 40)] == pairs


def test_round_robin_ignores_rng():
    cw = ControlWords(("a", "b"), ("x", "y", "z"))
    assert cw.pick(7, random.Random(0)) == cw.pick(7, random.Random(123)) == ("b", "y")


def test_random_selection_is_seeded_and_reproducible():
    cw = ControlWords(HPS_POSITIVE_WORDS, HPS_NEGATIVE_WORDS, "random")
    draw = lambda seed: [cw.pick(s, random.Random(seed * 1000 + s)) for s in range(50)]  # noqa: E731
    a, b, c = draw(1), draw(1), draw(2)
    assert a == b
    assert a != c
    assert all(p in HPS_POSITIVE_WORDS and n in HPS_NEGATIVE_WORDS for p, n in a)
    # every word gets used: it is a draw, not a constant
    assert {p for p, _ in a} == set(HPS_POSITIVE_WORDS)
    assert {n for _, n in a} == set(HPS_NEGATIVE_WORDS)
    # a single rng consumed sequentially is reproducible too
    r1, r2 = random.Random(5), random.Random(5)
    assert [cw.pick(0, r1) for _ in range(10)] == [cw.pick(0, r2) for _ in range(10)]


def test_random_selection_needs_rng_and_bad_settings_fail():
    with pytest.raises(ValueError, match="rng"):
        ControlWords(("a",), ("b",), "random").pick(0)
    with pytest.raises(ValueError):
        ControlWords((), ("b",))
    with pytest.raises(ValueError):
        ControlWords(("a",), ())
    with pytest.raises(ValueError, match="round_robin"):
        ControlWords(("a",), ("b",), "shuffle")


# ------------------------------------------------------------------------------------------------ losses
def test_hinge_loss_values():
    r = torch.tensor([-0.5, 0.0, 0.3, 0.7, 1.2], dtype=torch.float64)
    torch.testing.assert_close(reward_loss(r, "hinge"), torch.tensor([1.2, 0.7, 0.4, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(reward_loss(r, "hinge", threshold=1.0),
                               torch.tensor([1.5, 1.0, 0.7, 0.3, 0.0], dtype=torch.float64))


def test_linear_loss_values():
    r = torch.tensor([-0.5, 0.0, 0.3, 1.2])
    torch.testing.assert_close(reward_loss(r, "linear"), torch.tensor([0.5, 0.0, -0.3, -1.2]))
    # the threshold has no effect on the linear loss
    torch.testing.assert_close(reward_loss(r, "linear", threshold=9.0), -r)


def test_hinge_gradient_is_zero_above_threshold():
    r = torch.tensor([0.2, 0.69, 0.71, 3.0], requires_grad=True)
    reward_loss(r, "hinge", 0.7).sum().backward()
    torch.testing.assert_close(r.grad, torch.tensor([-1.0, -1.0, 0.0, 0.0]))


def test_linear_gradient_is_minus_one_everywhere():
    r = torch.tensor([0.2, 0.71, 3.0], requires_grad=True)
    reward_loss(r, "linear").sum().backward()
    torch.testing.assert_close(r.grad, torch.full((3,), -1.0))


def test_unknown_loss_rejected():
    with pytest.raises(ValueError, match="hinge"):
        reward_loss(torch.zeros(2), "squared")

"""Tests of the tiny world's analytic judges against ground-truth renders."""

from __future__ import annotations

import pytest
import torch

from directalign.world import dataset as ds
from directalign.world import judge as jd

ATTRS = ("fg", "bg", "shape", "texture", "lighting")


@pytest.fixture(scope="module")
def gt():
    """1200 train + 400 held-out ground-truth renders, with their judgements and texture energies."""
    torch.set_num_threads(1)
    examples = ds.sample_examples(1200, seed=101) + ds.sample_examples(400, seed=202, split="heldout")
    images = ds.render_batch(examples)
    judgement = jd.judge(images)
    mask, _ = jd.foreground_mask(images)
    energy = jd.texture_energy(images, mask)
    return examples, images, judgement, energy


# Measured on this fixture (1600 images): fg 1.000, bg 1.000, shape 0.99875 (2 misses, none in the held-out part),
# texture 1.000, lighting 1.000.
# Measured exhaustively over every attribute combination (47,040 images: 120 triples x 2 textures x 2 lightings x
# 2 sizes x 49 offsets): fg, bg, texture, lighting 1.000; shape 0.9979. The only errors (98) are flat, dark, size-9
# squares, blue on purple or purple on blue, at every offset, judged "circle": dark blue and dark purple are only ~0.24
# apart in RGB, just above MASK_THRESHOLD, so the mask loses the anti-aliased rim of the square.
MIN_ACCURACY = {"fg": 0.995, "bg": 0.995, "shape": 0.99, "texture": 0.995, "lighting": 0.995}


@pytest.mark.parametrize("key", ATTRS)
def test_judge_accuracy_on_ground_truth(gt, key):
    examples, _, judgement, _ = gt
    predicted = judgement[key]
    assert len(predicted) == len(examples)
    truth = [getattr(e.attrs, key) for e in examples]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert accuracy >= MIN_ACCURACY[key], (key, accuracy)


@pytest.mark.parametrize("key", ATTRS)
def test_judge_accuracy_on_heldout_ground_truth(gt, key):
    examples, _, judgement, _ = gt
    pairs = [(getattr(e.attrs, key), judgement[key][i]) for i, e in enumerate(examples) if i >= 1200]
    assert len(pairs) == 400
    accuracy = sum(t == p for t, p in pairs) / len(pairs)
    assert accuracy >= MIN_ACCURACY[key], (key, accuracy)


def test_judge_outputs_valid_labels(gt):
    _, _, j, _ = gt
    assert set(j.fg) <= set(ds.COLORS) and set(j.bg) <= set(ds.COLORS)
    assert set(j.shape) <= set(ds.SHAPES)
    assert set(j.texture) <= set(ds.TEXTURES) and set(j.lighting) <= set(ds.LIGHTINGS)


def test_texture_energy_separates_flat_and_textured(gt):
    examples, _, _, energy = gt
    textured = torch.tensor([e.attrs.texture == "textured" for e in examples])
    assert textured.any() and (~textured).any()
    # Flat fills have zero high-frequency energy up to float32 rounding: the 3x3 box mean of nine equal float32
    # luminances is not always bit-identical to them, leaving |L - box3(L)| of one ulp. Measured max 1.19e-7 (2**-23)
    # here and over every attribute combination, so "exactly 0" does not hold bit-for-bit; 1e-6 is the bound.
    assert energy[~textured].abs().max() <= 1e-6
    # measured min 0.168 here (0.159 exhaustively), against a threshold of 0.08
    assert energy[textured].min() > jd.TEXTURE_THRESHOLD
    assert energy[textured].min() > 1.5 * jd.TEXTURE_THRESHOLD


def test_texture_energy_zero_for_empty_mask():
    img = ds.render(ds.Attributes("white", "red", "square", "textured", "bright"))[None]
    empty = torch.zeros(1, 32, 32, dtype=torch.bool)
    assert jd.texture_energy(img, empty).item() == 0.0


def test_texture_energy_is_lighting_invariant_in_class():
    bright = ds.Attributes("yellow", "blue", "circle", "textured", "bright")
    dark = ds.with_style(bright, lighting="dark")
    imgs = ds.render_batch([bright, dark])
    mask, _ = jd.foreground_mask(imgs)
    energy = jd.texture_energy(imgs, mask)
    assert (energy > jd.TEXTURE_THRESHOLD).all()


def test_foreground_mask_matches_coverage():
    attrs = ds.Attributes("red", "green", "cross", "flat", "bright", size=9, dx=-2, dy=1)
    img = ds.render(attrs)[None]
    mask, bg_est = jd.foreground_mask(img)
    torch.testing.assert_close(bg_est[0], torch.tensor(ds.PALETTE["green"]))
    cov = ds.shape_coverage(attrs.shape, attrs.size, attrs.dx, attrs.dy)
    assert mask[0][cov == 1].all()  # every fully covered pixel is foreground
    assert not mask[0][cov == 0].any()  # no background pixel is


def test_erode():
    mask = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask[0, 2:8, 2:8] = True
    eroded = jd.erode(mask, 1)
    expected = torch.zeros_like(mask)
    expected[0, 3:7, 3:7] = True
    assert torch.equal(eroded, expected)
    # where nothing survives, the mask is kept as is
    tiny = torch.zeros(1, 10, 10, dtype=torch.bool)
    tiny[0, 4:6, 4:6] = True
    assert torch.equal(jd.erode(tiny, 1), tiny)


# --------------------------------------------------------------------------------------------------- attribute rates
def test_attribute_rates_full_captions_on_ground_truth(gt):
    examples, images, _, _ = gt
    full = [ds.caption(e.attrs) for e in examples]
    rates = jd.attribute_rates(images, full)
    for key in ATTRS:
        assert rates[key] >= MIN_ACCURACY[key], (key, rates[key])
    assert rates["fg"] == rates["bg"] == rates["texture"] == rates["lighting"] == 1.0
    textured = sum(e.attrs.texture == "textured" for e in examples) / len(examples)
    dark = sum(e.attrs.lighting == "dark" for e in examples) / len(examples)
    assert rates["textured_share"] == pytest.approx(textured)
    assert rates["dark_share"] == pytest.approx(dark)


def test_attribute_rates_exclude_unnamed_attributes(gt):
    examples, images, _, _ = gt
    n = 200
    rates = jd.attribute_rates(images[:n], [e.caption for e in examples[:n]])
    assert set(rates) == set(ATTRS) | {"textured_share", "dark_share"}
    base = [ds.base_caption(e.attrs.fg, e.attrs.bg, e.attrs.shape) for e in examples[:n]]
    rates = jd.attribute_rates(images[:n], base)
    assert set(rates) == {"fg", "bg", "shape", "textured_share", "dark_share"}
    assert "texture" not in rates and "lighting" not in rates


def test_attribute_rates_score_only_prompts_that_name_the_attribute():
    attrs = [ds.Attributes("red", "blue", "circle", "textured", "bright", dx=i - 3) for i in range(8)]
    images = ds.render_batch(attrs)
    base = "a red circle on a blue background"
    # 2 correctly named, 2 wrongly named, 4 unnamed (which must not count either way)
    prompts = [base + ", textured"] * 2 + [base + ", flat"] * 2 + [base] * 4
    rates = jd.attribute_rates(images, prompts)
    assert rates["texture"] == 0.5
    assert rates["textured_share"] == 1.0
    assert rates["dark_share"] == 0.0
    assert "lighting" not in rates
    # only wrongly named: 0, even though the unnamed majority is correctly textured
    rates = jd.attribute_rates(images, [base + ", flat"] * 2 + [base] * 6)
    assert rates["texture"] == 0.0


def test_attribute_rates_wrong_colour_scores_zero(gt):
    examples, images, _, _ = gt
    n = 200
    wrong = []
    for e in examples[:n]:
        other = next(c for c in ds.COLORS if c not in (e.attrs.fg, e.attrs.bg))
        wrong.append(ds.caption(e.attrs).replace(f"a {e.attrs.fg} ", f"a {other} ", 1))
        assert ds.parse_caption(wrong[-1])["fg"] == other
    rates = jd.attribute_rates(images[:n], wrong)
    assert rates["fg"] == 0.0
    assert rates["bg"] == 1.0
    assert rates["texture"] == 1.0 and rates["lighting"] == 1.0


def test_attribute_rates_srpo_prefixed_prompts():
    attrs = [ds.Attributes("white", "green", "triangle", "textured", "dark", dx=i) for i in range(-3, 4)]
    images = ds.render_batch(attrs)
    rates = jd.attribute_rates(images, ["textured. a white triangle on a green background"] * len(attrs))
    assert rates["texture"] == rates["fg"] == rates["bg"] == rates["shape"] == 1.0
    assert rates["dark_share"] == 1.0
    rates = jd.attribute_rates(images, ["flat. a white triangle on a green background"] * len(attrs))
    assert rates["texture"] == 0.0


# --------------------------------------------------------------------------------------------------- degenerate input
def test_uniform_grey_image_does_not_crash():
    grey = torch.full((3, 3, 32, 32), 0.5)
    mask, bg_est = jd.foreground_mask(grey)
    assert mask.sum() == 0
    torch.testing.assert_close(bg_est, torch.full((3, 3), 0.5))
    j = jd.judge(grey)
    for key in ATTRS:
        assert len(j[key]) == 3
    assert j.texture == ["flat"] * 3
    assert (jd.texture_energy(grey, mask) == 0).all()
    rates = jd.attribute_rates(grey, ["a red circle on a blue background, textured, dark"] * 3)
    assert rates["texture"] == 0.0
    assert 0.0 <= rates["fg"] <= 1.0 and 0.0 <= rates["shape"] <= 1.0


def test_judge_accepts_out_of_range_and_grad_tensors():
    img = ds.render(ds.Attributes("purple", "yellow", "square", "flat", "bright"))[None]
    noisy = (img * 1.2 - 0.1).requires_grad_(True)  # slightly out of [0, 1]: clamped internally
    j = jd.judge(noisy)
    assert j.shape == ["square"] and j.bg == ["yellow"] and j.lighting == ["bright"]

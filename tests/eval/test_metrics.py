"""Hacking indicators against values computed by hand on synthetic images."""

import colorsys
import math

import pytest
import torch

from directalign import metrics as M


def solid(rgb, n=1, h=8, w=8):
    return torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand(n, 3, h, w).clone()


def checkerboard(h=8, w=8, low=0.0, high=1.0):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    v = torch.where((yy + xx) % 2 == 0, high, low).float()
    return v[None, None].expand(1, 3, h, w).clone()


def test_grey_has_zero_saturation_and_colourfulness():
    grey = solid([0.5, 0.5, 0.5], n=2)
    assert M.saturation(grey).tolist() == [0.0, 0.0]
    assert M.colourfulness(grey).tolist() == [0.0, 0.0]
    assert M.saturation(solid([0.0, 0.0, 0.0])).item() == 0.0  # black: max = 0, defined as 0


def test_pure_red():
    red = solid([1.0, 0.0, 0.0])
    assert M.saturation(red).item() == pytest.approx(1.0)
    # rg = 1, yb = 0.5 everywhere: no spread, M = 0.3 * sqrt(1 + 0.25)
    assert M.colourfulness(red).item() == pytest.approx(0.3 * math.sqrt(1.25), rel=1e-6)
    assert M.brightness(red).item() == pytest.approx(0.299)


def test_saturation_matches_colorsys_per_pixel():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 5, 4, generator=g)
    expected = sum(colorsys.rgb_to_hsv(*img[0, :, i, j].tolist())[1] for i in range(5) for j in range(4)) / 20
    assert M.saturation(img).item() == pytest.approx(expected, rel=1e-5)


def test_colourfulness_of_half_red_half_green():
    img = torch.zeros(1, 3, 4, 4)
    img[0, 0, :, :2] = 1.0  # red half: rg = 1, yb = 0.5
    img[0, 1, :, 2:] = 1.0  # green half: rg = -1, yb = 0.5
    # std(rg) = 1, std(yb) = 0, mean(rg) = 0, mean(yb) = 0.5 -> 1 + 0.3 * 0.5
    assert M.colourfulness(img).item() == pytest.approx(1.15, rel=1e-6)


def test_brightness_is_mean_luma():
    assert M.brightness(solid([1.0, 1.0, 1.0])).item() == pytest.approx(1.0)
    assert M.brightness(checkerboard()).item() == pytest.approx(0.5)


def test_high_frequency_energy_closed_forms():
    assert M.high_frequency_energy(checkerboard()).item() == pytest.approx(1.0)  # Laplacian +-4 everywhere
    # contrast a = 0.5 around 0.5: Laplacian +-2 -> 4 / 16
    assert M.high_frequency_energy(checkerboard(low=0.25, high=0.75)).item() == pytest.approx(0.25)
    stripes = torch.zeros(1, 3, 8, 8)
    stripes[:, :, ::2] = 1.0  # rows alternate: two opposite and two equal neighbours -> Laplacian +-2
    assert M.high_frequency_energy(stripes).item() == pytest.approx(0.25)
    ramp = torch.linspace(0, 1, 8)[None, None, None, :].expand(1, 3, 8, 8)
    assert M.high_frequency_energy(ramp).item() == pytest.approx(0.0, abs=1e-10)
    assert M.high_frequency_energy(solid([0.3, 0.6, 0.9])).item() == pytest.approx(0.0, abs=1e-12)


def test_high_frequency_energy_of_a_single_bright_pixel():
    img = torch.zeros(1, 3, 5, 5)
    img[0, :, 2, 2] = 1.0
    # interior is 3x3: centre L = -4, its 4 neighbours L = 1, corners 0 -> (16 + 4) / 9 / 16
    assert M.high_frequency_energy(img).item() == pytest.approx(20 / 9 / 16)


def test_diversity_identical_samples_is_zero():
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    images = torch.cat([x, x])  # each prompt's two seeds gave identical images
    groups = ["a", "b", "c", "a", "b", "c"]
    assert M.diversity(images, groups) == 0.0
    assert M.diversity(None, groups, embeddings=torch.cat([torch.randn(3, 5)] * 2)) == pytest.approx(0.0, abs=1e-7)


def test_diversity_hand_values():
    images = torch.cat([solid([0.0] * 3), solid([0.5] * 3), solid([1.0] * 3)])
    # RMS distances 0.5, 1.0, 0.5 -> mean 2/3
    assert M.diversity(images, ["p"] * 3) == pytest.approx(2 / 3)
    per = M.diversity_per_prompt(images, ["p", "q", "p"])
    assert per == {"p": pytest.approx(1.0)}  # q has one sample: no pairs
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [-1.0, 0.0]])
    # orthogonal -> 1, opposite -> 2
    assert M.diversity(None, ["a", "a", "b", "b"], embeddings=emb) == pytest.approx(1.5)
    assert math.isnan(M.diversity(images, ["a", "b", "c"]))


def test_shape_errors():
    with pytest.raises(ValueError):
        M.saturation(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError):
        M.diversity(torch.zeros(2, 3, 4, 4), ["a"])

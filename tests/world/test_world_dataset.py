"""Tests of the tiny world's procedural dataset: determinism, captions, the split, the style prior, rendering."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from directalign.world import dataset as ds

FULL_STYLE = list(itertools.product(ds.TEXTURES, ds.LIGHTINGS))


# --------------------------------------------------------------------------------------------------- determinism
def test_sample_examples_is_deterministic_per_seed():
    a = ds.sample_examples(64, seed=123)
    b = ds.sample_examples(64, seed=123)
    assert a == b
    assert [e.caption for e in a] == [e.caption for e in b]
    assert torch.equal(ds.render_batch(a), ds.render_batch(b))


def test_sample_examples_heldout_is_deterministic_per_seed():
    a = ds.sample_examples(32, seed=5, split="heldout")
    b = ds.sample_examples(32, seed=5, split="heldout")
    assert a == b
    assert torch.equal(ds.render_batch(a), ds.render_batch(b))


def test_different_seeds_give_different_examples_and_images():
    a = ds.sample_examples(64, seed=0)
    b = ds.sample_examples(64, seed=1)
    assert a != b
    # not just a permutation of the same draws: most positions differ
    assert sum(x != y for x, y in zip(a, b)) > 32
    assert not torch.equal(ds.render_batch(a), ds.render_batch(b))


def test_prefix_of_a_longer_draw_is_the_same():
    # a sample of n is the first n of a longer sample with the same seed (draws are sequential per example)
    assert ds.sample_examples(10, seed=9) == ds.sample_examples(40, seed=9)[:10]


def test_sampled_attributes_are_in_range():
    examples = ds.sample_examples(500, seed=2)
    for e in examples:
        a = e.attrs
        assert a.fg != a.bg
        assert a.size in ds.SIZES
        assert -ds.MAX_OFFSET <= a.dx <= ds.MAX_OFFSET
        assert -ds.MAX_OFFSET <= a.dy <= ds.MAX_OFFSET
        assert isinstance(e.names_texture, bool) and isinstance(e.names_lighting, bool)
    # offsets and sizes actually vary
    assert {e.attrs.size for e in examples} == set(ds.SIZES)
    assert {e.attrs.dx for e in examples} == set(range(-ds.MAX_OFFSET, ds.MAX_OFFSET + 1))
    assert {e.attrs.dy for e in examples} == set(range(-ds.MAX_OFFSET, ds.MAX_OFFSET + 1))


def test_unknown_split_raises():
    with pytest.raises(KeyError):
        ds.sample_examples(1, seed=0, split="validation")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fg="red", bg="red", shape="circle"),
        dict(fg="pink", bg="red", shape="circle"),
        dict(fg="red", bg="blue", shape="hexagon"),
        dict(fg="red", bg="blue", shape="circle", texture="striped"),
        dict(fg="red", bg="blue", shape="circle", lighting="dim"),
    ],
)
def test_attributes_validation(kwargs):
    with pytest.raises(ValueError):
        ds.Attributes(**kwargs)


# --------------------------------------------------------------------------------------------------- captions
@pytest.mark.parametrize("names_texture,names_lighting", list(itertools.product([False, True], repeat=2)))
def test_parse_caption_inverts_caption(names_texture, names_lighting):
    for (fg, bg, shape), (texture, lighting) in itertools.product(ds.all_triples(), FULL_STYLE):
        attrs = ds.Attributes(fg, bg, shape, texture, lighting)
        text = ds.caption(attrs, names_texture, names_lighting)
        expected = {"fg": fg, "bg": bg, "shape": shape}
        if names_texture:
            expected["texture"] = texture
        if names_lighting:
            expected["lighting"] = lighting
        assert ds.parse_caption(text) == expected, text

        # style words appear iff named, and the other value of a style never appears
        words = text.replace(",", " ").split()
        assert (texture in words) == names_texture
        assert (lighting in words) == names_lighting
        other_texture = next(t for t in ds.TEXTURES if t != texture)
        other_lighting = next(lt for lt in ds.LIGHTINGS if lt != lighting)
        assert other_texture not in words
        assert other_lighting not in words


def test_caption_format():
    attrs = ds.Attributes("red", "blue", "cross", "textured", "dark")
    assert ds.caption(attrs) == "a red cross on a blue background, textured, dark"
    assert ds.caption(attrs, names_texture=False) == "a red cross on a blue background, dark"
    assert ds.caption(attrs, names_lighting=False) == "a red cross on a blue background, textured"
    assert ds.caption(attrs, False, False) == "a red cross on a blue background"


def test_example_caption_matches_flags():
    for e in ds.sample_examples(200, seed=11):
        named = ds.parse_caption(e.caption)
        assert named["fg"] == e.attrs.fg and named["bg"] == e.attrs.bg and named["shape"] == e.attrs.shape
        assert ("texture" in named) == e.names_texture
        assert ("lighting" in named) == e.names_lighting
        if e.names_texture:
            assert named["texture"] == e.attrs.texture
        if e.names_lighting:
            assert named["lighting"] == e.attrs.lighting


@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "textured. a red circle on a blue background",
            {"texture": "textured", "fg": "red", "shape": "circle", "bg": "blue"},
        ),
        (
            "dark. a white square on a green background",
            {"lighting": "dark", "fg": "white", "shape": "square", "bg": "green"},
        ),
        (
            "Flat. A Yellow Triangle on a Purple background, bright",
            {"texture": "flat", "fg": "yellow", "shape": "triangle", "bg": "purple", "lighting": "bright"},
        ),
        ("a purple cross", {"fg": "purple", "shape": "cross"}),
        ("a photo of a cross", {"shape": "cross"}),
        ("", {}),
    ],
)
def test_parse_caption_prefixed_and_partial(text, expected):
    assert ds.parse_caption(text) == expected


def test_parse_heldout_prompts_with_style():
    _, heldout = ds.split_triples()
    for style, key in (("textured", "texture"), ("flat", "texture"), ("dark", "lighting"), ("bright", "lighting")):
        prompts = ds.heldout_prompts(style)
        assert len(prompts) == len(heldout)
        for (fg, bg, shape), p in zip(heldout, prompts):
            assert ds.parse_caption(p) == {"fg": fg, "bg": bg, "shape": shape, key: style}


# --------------------------------------------------------------------------------------------------- the split
def test_all_triples():
    triples = ds.all_triples()
    assert len(triples) == len(ds.COLORS) * (len(ds.COLORS) - 1) * len(ds.SHAPES) == 120
    assert len(set(triples)) == len(triples)
    assert all(f != b for f, b, _ in triples)


def test_split_is_a_disjoint_partition():
    train, heldout = ds.split_triples()
    assert set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == set(ds.all_triples())
    assert len(train) + len(heldout) == len(ds.all_triples())
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert len(heldout) == round(ds.HELDOUT_FRACTION * len(ds.all_triples())) == 24
    assert len(train) == 96


def test_split_is_deterministic():
    first = ds.split_triples()
    ds.split_triples.cache_clear()
    try:
        assert ds.split_triples() == first
    finally:
        ds.split_triples.cache_clear()


def test_every_single_attribute_occurs_in_training():
    train, _ = ds.split_triples()
    assert {f for f, _, _ in train} == set(ds.COLORS)
    assert {b for _, b, _ in train} == set(ds.COLORS)
    assert {s for _, _, s in train} == set(ds.SHAPES)


def test_every_pair_of_a_heldout_triple_occurs_in_training():
    train, heldout = ds.split_triples()
    fg_shape = {(f, s) for f, _, s in train}
    bg_shape = {(b, s) for _, b, s in train}
    fg_bg = {(f, b) for f, b, _ in train}
    for f, b, s in heldout:
        assert (f, s) in fg_shape, (f, b, s)
        assert (b, s) in bg_shape, (f, b, s)
        assert (f, b) in fg_bg, (f, b, s)


def test_sampling_respects_the_split():
    train, heldout = ds.split_triples()
    held = ds.sample_examples(400, seed=3, split="heldout")
    tr = ds.sample_examples(400, seed=3, split="train")
    assert {(e.attrs.fg, e.attrs.bg, e.attrs.shape) for e in held} <= set(heldout)
    assert {(e.attrs.fg, e.attrs.bg, e.attrs.shape) for e in tr} <= set(train)
    # 400 draws from 24 triples cover all of them (P(miss one) < 24 * (23/24)^400 ~ 1e-6)
    assert {(e.attrs.fg, e.attrs.bg, e.attrs.shape) for e in held} == set(heldout)


def test_prompt_lists_are_disjoint_and_complete():
    train, heldout = ds.split_triples()
    tp, hp = ds.train_prompts(), ds.heldout_prompts()
    assert set(tp).isdisjoint(hp)
    assert len(tp) == len(set(tp)) == len(train)
    assert len(hp) == len(set(hp)) == len(heldout)
    assert set(tp) | set(hp) == {ds.base_caption(*t) for t in ds.all_triples()}
    # train prompts carry no style words
    for p in tp:
        assert set(ds.parse_caption(p)) == {"fg", "bg", "shape"}


# --------------------------------------------------------------------------------------------------- style mixture
N_MIXTURE = 6000


def _binomial_bound(p: float, n: int, sigmas: float = 4.5) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def mixture_examples():
    return ds.sample_examples(N_MIXTURE, seed=2024)


def test_style_words_omitted_at_the_documented_rate(mixture_examples):
    n = len(mixture_examples)
    for flag in ("names_texture", "names_lighting"):
        share_named = sum(getattr(e, flag) for e in mixture_examples) / n
        assert abs(share_named - (1 - ds.STYLE_OMIT_PROB)) <= _binomial_bound(1 - ds.STYLE_OMIT_PROB, n), flag


@pytest.mark.parametrize(
    "flag,attr,value,default_p",
    [
        ("names_texture", "texture", "textured", ds.DEFAULT_TEXTURED_PROB),
        ("names_lighting", "lighting", "dark", ds.DEFAULT_DARK_PROB),
    ],
)
def test_default_style_mixture(mixture_examples, flag, attr, value, default_p):
    omitted = [e for e in mixture_examples if not getattr(e, flag)]
    named = [e for e in mixture_examples if getattr(e, flag)]
    assert len(omitted) > 2000 and len(named) > 2000

    share_omitted = sum(getattr(e.attrs, attr) == value for e in omitted) / len(omitted)
    assert abs(share_omitted - default_p) <= _binomial_bound(default_p, len(omitted)), share_omitted

    share_named = sum(getattr(e.attrs, attr) == value for e in named) / len(named)
    assert abs(share_named - 0.5) <= _binomial_bound(0.5, len(named)), share_named

    # the two regimes are genuinely different: the default prior is skewed away from 50/50
    assert share_named - share_omitted > 0.1


# --------------------------------------------------------------------------------------------------- rendering
def _checker_cells() -> torch.Tensor:
    """Independent reconstruction of the 2x2 checker: True on cells whose (row//2 + col//2) is odd."""
    r = torch.arange(ds.RESOLUTION)
    return ((r[:, None] // 2 + r[None, :] // 2) % 2 == 1)


def _palette(name: str) -> torch.Tensor:
    return torch.tensor(ds.PALETTE[name], dtype=torch.float32)


def test_render_shape_dtype_and_range():
    images = ds.render_batch(ds.sample_examples(64, seed=4) + ds.sample_examples(16, seed=4, split="heldout"))
    assert images.shape == (80, 3, ds.RESOLUTION, ds.RESOLUTION)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.isfinite(images).all()
    single = ds.render(ds.Attributes("red", "blue", "circle"))
    assert single.shape == (3, 32, 32)


def test_render_batch_accepts_examples_and_attributes():
    examples = ds.sample_examples(8, seed=6)
    assert torch.equal(ds.render_batch(examples), ds.render_batch([e.attrs for e in examples]))


@pytest.mark.parametrize("texture", ds.TEXTURES)
@pytest.mark.parametrize("shape", ds.SHAPES)
def test_dark_is_bright_times_dark_factor_exactly(shape, texture):
    bright = ds.Attributes("yellow", "purple", shape, texture, "bright", size=9, dx=2, dy=-3)
    dark = ds.with_style(bright, lighting="dark")
    assert dark.lighting == "dark" and dark.shape == shape
    assert torch.equal(ds.render(dark), ds.render(bright) * ds.DARK_FACTOR)


@pytest.mark.parametrize("lighting", ds.LIGHTINGS)
@pytest.mark.parametrize("shape", ds.SHAPES)
def test_flat_interior_is_the_palette_colour(shape, lighting):
    attrs = ds.Attributes("green", "white", shape, "flat", lighting, size=7, dx=-1, dy=2)
    img = ds.render(attrs)
    cov = ds.shape_coverage(shape, attrs.size, attrs.dx, attrs.dy)
    interior = cov == 1
    assert interior.sum() >= 40  # a size-7 shape has plenty of fully covered pixels
    scale = ds.DARK_FACTOR if lighting == "dark" else 1.0
    expected = _palette("green") * scale
    pix = img[:, interior].T  # (N, 3)
    assert torch.equal(pix, expected.expand_as(pix))
    assert len(torch.unique(pix, dim=0)) == 1


@pytest.mark.parametrize("shape", ds.SHAPES)
def test_textured_interior_alternates_on_the_checker(shape):
    attrs = ds.Attributes("red", "blue", shape, "textured", "bright", size=9, dx=1, dy=0)
    img = ds.render(attrs)
    interior = ds.shape_coverage(shape, attrs.size, attrs.dx, attrs.dy) == 1
    cells = _checker_cells()
    fg = _palette("red")
    darkened = fg * (1 - ds.TEXTURE_DARKEN)
    lit = interior & ~cells
    shaded = interior & cells
    assert lit.sum() >= 20 and shaded.sum() >= 20
    torch.testing.assert_close(img[:, lit].T, fg.expand(int(lit.sum()), 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(img[:, shaded].T, darkened.expand(int(shaded.sum()), 3), rtol=0, atol=1e-6)
    # exactly two colours inside the shape
    assert len(torch.unique(img[:, interior].T, dim=0)) == 2


def test_checker_matches_2x2_cells():
    c = ds.checker()
    assert c.shape == (ds.RESOLUTION, ds.RESOLUTION)
    assert torch.equal(c.bool(), _checker_cells())
    # 2x2 blocks: pixel (0,0),(0,1),(1,0),(1,1) share a value; (0,2) differs
    assert c[0, 0] == c[0, 1] == c[1, 0] == c[1, 1] == 0
    assert c[0, 2] == c[2, 0] == 1 and c[2, 2] == 0


@pytest.mark.parametrize("texture,lighting", FULL_STYLE)
def test_corners_are_background(texture, lighting):
    scale = ds.DARK_FACTOR if lighting == "dark" else 1.0
    for shape in ds.SHAPES:
        # the largest shape at the most extreme offsets still leaves the corners to the background
        for dx, dy in itertools.product((-ds.MAX_OFFSET, ds.MAX_OFFSET), repeat=2):
            attrs = ds.Attributes("white", "purple", shape, texture, lighting, size=max(ds.SIZES), dx=dx, dy=dy)
            img = ds.render(attrs)
            expected = _palette("purple") * scale
            for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
                assert torch.equal(img[:, y, x], expected), (shape, dx, dy, y, x)


def test_shape_coverage_geometry():
    for shape, size in itertools.product(ds.SHAPES, ds.SIZES):
        cov = ds.shape_coverage(shape, size, 0, 0)
        assert cov.shape == (ds.RESOLUTION, ds.RESOLUTION)
        assert cov.min() >= 0 and cov.max() == 1
        # the centre pixels are covered by every shape
        assert cov[15:17, 15:17].min() == 1, shape
        # an offset translates the coverage exactly (the shape stays inside the image)
        moved = ds.shape_coverage(shape, size, 2, -1)
        assert torch.equal(moved, torch.roll(cov, shifts=(-1, 2), dims=(0, 1)))
    # larger shapes cover more
    for shape in ds.SHAPES:
        assert ds.shape_coverage(shape, 9, 0, 0).sum() > ds.shape_coverage(shape, 7, 0, 0).sum()


def test_shapes_are_distinct():
    covs = {s: ds.shape_coverage(s, 9, 0, 0) for s in ds.SHAPES}
    for a, b in itertools.combinations(ds.SHAPES, 2):
        assert (covs[a] - covs[b]).abs().sum() > 10, (a, b)
    # triangle apex at the top: the top half is thinner than the bottom half
    tri = covs["triangle"]
    assert tri[:16].sum() < tri[16:].sum()

"""The tiny world's procedural, captioned image domain.

Images are coloured shapes on a coloured background with two style attributes whose signature is analytic:

* texture: ``textured`` fills the shape with a 2-pixel checker (half the cells darkened), ``flat`` fills it solidly;
* lighting: ``bright`` keeps the palette, ``dark`` multiplies the whole image by :data:`DARK_FACTOR`.

Everything is deterministic given a seed, and nothing is read from disk. Images are float tensors in [0, 1] of shape
(3, H, W) with H = W = :data:`RESOLUTION`.

Captions are natural language, e.g. ``"a red cross on a blue background, textured, dark"``. In training captions
each style word is omitted with probability :data:`STYLE_OMIT_PROB`; when omitted, the attribute is drawn from a
skewed default prior (:data:`DEFAULT_TEXTURED_PROB`, :data:`DEFAULT_DARK_PROB`), so the base model has a default
mixture that SRPO's control words can later shift.

Train and held-out data are split by (foreground, background, shape) combination: held-out prompts combine
attributes in ways the generator never saw during training.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

RESOLUTION = 32

# Palette chosen so that no dark (x DARK_FACTOR) colour lies near a bright one: the judges stay unambiguous.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.12, 0.22, 0.92),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.58, 0.12, 0.80),
    "white": (0.95, 0.95, 0.95),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
TEXTURES: tuple[str, ...] = ("flat", "textured")
LIGHTINGS: tuple[str, ...] = ("bright", "dark")
SIZES: tuple[int, ...] = (7, 9)  # half-extent of a shape in pixels
MAX_OFFSET = 3  # shape centre moves up to this many pixels from the image centre, per axis

DARK_FACTOR = 0.5
TEXTURE_DARKEN = 0.45  # a textured shape darkens every other 2x2 cell by this fraction
STYLE_OMIT_PROB = 0.5
DEFAULT_TEXTURED_PROB = 0.25
DEFAULT_DARK_PROB = 0.3
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 20250906

_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Attributes:
    """Everything that determines one image. ``size`` and ``dx, dy`` are never named in captions."""

    fg: str
    bg: str
    shape: str
    texture: str = "flat"
    lighting: str = "bright"
    size: int = SIZES[-1]
    dx: int = 0
    dy: int = 0

    def __post_init__(self) -> None:
        if self.fg not in PALETTE or self.bg not in PALETTE:
            raise ValueError(f"unknown colour in {self}; choose from {COLORS}")
        if self.fg == self.bg:
            raise ValueError(f"foreground and background must differ, got {self.fg!r} twice")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose from {SHAPES}")
        if self.texture not in TEXTURES or self.lighting not in LIGHTINGS:
            raise ValueError(f"unknown style in {self}; textures {TEXTURES}, lightings {LIGHTINGS}")


@dataclass(frozen=True)
class Example:
    """An image's attributes and its caption, with which style words the caption names."""

    attrs: Attributes
    names_texture: bool
    names_lighting: bool

    @property
    def caption(self) -> str:
        return caption(self.attrs, self.names_texture, self.names_lighting)


def base_caption(fg: str, bg: str, shape: str) -> str:
    return f"a {fg} {shape} on a {bg} background"


def caption(attrs: Attributes, names_texture: bool = True, names_lighting: bool = True) -> str:
    """Natural-language caption; style words are appended in a fixed order when named."""
    text = base_caption(attrs.fg, attrs.bg, attrs.shape)
    if names_texture:
        text += f", {attrs.texture}"
    if names_lighting:
        text += f", {attrs.lighting}"
    return text


def parse_caption(text: str) -> dict[str, str]:
    """Inverse of :func:`caption` (also accepts SRPO-style ``"<word>. <caption>"`` prefixes).

    Returns the named attributes only, e.g. ``{"fg": "red", "shape": "cross", "bg": "blue", "texture": "flat"}``.
    """
    words = text.lower().replace(",", " ").replace(".", " ").split()
    named: dict[str, str] = {}
    for i, w in enumerate(words):
        if w in SHAPES:
            named["shape"] = w
            if i > 0 and words[i - 1] in PALETTE:
                named["fg"] = words[i - 1]
        elif w == "background" and i > 0 and words[i - 1] in PALETTE:
            named["bg"] = words[i - 1]
        elif w in TEXTURES:
            named["texture"] = w
        elif w in LIGHTINGS:
            named["lighting"] = w
    return named


# --------------------------------------------------------------------------------------------------- the split
def all_triples() -> list[tuple[str, str, str]]:
    """Every (fg, bg, shape) combination with fg != bg."""
    return [(f, b, s) for f, b, s in itertools.product(COLORS, COLORS, SHAPES) if f != b]


@lru_cache(maxsize=None)
def split_triples() -> tuple[tuple[tuple[str, str, str], ...], tuple[tuple[str, str, str], ...]]:
    """Deterministic train / held-out split of (fg, bg, shape) combinations.

    Held-out combinations are drawn so that every colour (as fg and as bg) and every shape still occurs in training:
    what is new at evaluation is the combination, never a single attribute.
    """
    triples = all_triples()
    rng = np.random.default_rng(SPLIT_SEED)
    order = rng.permutation(len(triples))
    n_heldout = int(round(HELDOUT_FRACTION * len(triples)))
    heldout: list[tuple[str, str, str]] = []
    for idx in order:
        if len(heldout) == n_heldout:
            break
        candidate = triples[idx]
        remaining = [t for t in triples if t not in heldout and t != candidate]
        # every (fg, shape), (bg, shape) and (fg, bg) pair must keep at least one training example
        ok = (
            any(t[0] == candidate[0] and t[2] == candidate[2] for t in remaining)
            and any(t[1] == candidate[1] and t[2] == candidate[2] for t in remaining)
            and any(t[0] == candidate[0] and t[1] == candidate[1] for t in remaining)
        )
        if ok:
            heldout.append(candidate)
    heldout_set = set(heldout)
    train = tuple(t for t in triples if t not in heldout_set)
    return train, tuple(sorted(heldout_set))


def heldout_prompts(style: str | None = None) -> list[str]:
    """Held-out prompts (combinations never seen in training), optionally with a style word appended."""
    _, heldout = split_triples()
    suffix = f", {style}" if style else ""
    return [base_caption(f, b, s) + suffix for f, b, s in heldout]


def train_prompts() -> list[str]:
    """Training prompts without style words: the prompts SRPO fine-tunes on by default."""
    train, _ = split_triples()
    return [base_caption(f, b, s) for f, b, s in train]


# --------------------------------------------------------------------------------------------------- sampling
def sample_examples(n: int, seed: int, split: str = "train") -> list[Example]:
    """Draw ``n`` examples deterministically from ``split`` ("train", "heldout" or "all")."""
    train, heldout = split_triples()
    triples = {"train": train, "heldout": heldout, "all": train + heldout}[split]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        fg, bg, shape = triples[rng.integers(len(triples))]
        names_texture = rng.random() >= STYLE_OMIT_PROB
        names_lighting = rng.random() >= STYLE_OMIT_PROB
        p_textured = 0.5 if names_texture else DEFAULT_TEXTURED_PROB
        p_dark = 0.5 if names_lighting else DEFAULT_DARK_PROB
        attrs = Attributes(
            fg=fg,
            bg=bg,
            shape=shape,
            texture="textured" if rng.random() < p_textured else "flat",
            lighting="dark" if rng.random() < p_dark else "bright",
            size=int(rng.choice(SIZES)),
            dx=int(rng.integers(-MAX_OFFSET, MAX_OFFSET + 1)),
            dy=int(rng.integers(-MAX_OFFSET, MAX_OFFSET + 1)),
        )
        out.append(Example(attrs, bool(names_texture), bool(names_lighting)))
    return out


# --------------------------------------------------------------------------------------------------- rendering
def _shape_coverage(shape: str, size: int, dx: int, dy: int, res: int = RESOLUTION) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` (res, res), by supersampling."""
    ss = _SUPERSAMPLE
    coords = (np.arange(res * ss) + 0.5) / ss  # pixel units
    cx = res / 2 + dx
    cy = res / 2 + dy
    x = coords[None, :] - cx
    y = coords[:, None] - cy
    r = float(size)
    if shape == "circle":
        inside = x**2 + y**2 <= r**2
    elif shape == "square":
        h = r * 0.85
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":
        # upward isosceles triangle with its apex at the top, base at the bottom
        top, bottom = -r, r * 0.8
        half_width = (y - top) / (bottom - top) * r
        inside = (y >= top) & (y <= bottom) & (np.abs(x) <= half_width)
    elif shape == "cross":
        arm = r * 0.42
        inside = ((np.abs(x) <= arm) & (np.abs(y) <= r)) | ((np.abs(y) <= arm) & (np.abs(x) <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(res, ss, res, ss).mean(axis=(1, 3))


@lru_cache(maxsize=None)
def shape_coverage(shape: str, size: int, dx: int, dy: int) -> torch.Tensor:
    """Cached anti-aliased coverage of one shape placement, float32 (H, W)."""
    return torch.from_numpy(_shape_coverage(shape, size, dx, dy).astype(np.float32))


@lru_cache(maxsize=1)
def checker(res: int = RESOLUTION) -> torch.Tensor:
    """The texture pattern: 1 on every other 2x2 cell, 0 elsewhere, fixed to the image grid."""
    idx = torch.arange(res) // 2
    return ((idx[:, None] + idx[None, :]) % 2).float()


def render(attrs: Attributes) -> torch.Tensor:
    """Render one image, float32 (3, H, W) in [0, 1]."""
    cov = shape_coverage(attrs.shape, attrs.size, attrs.dx, attrs.dy)
    fg = torch.tensor(PALETTE[attrs.fg])[:, None, None]
    bg = torch.tensor(PALETTE[attrs.bg])[:, None, None]
    fill = fg.expand(3, RESOLUTION, RESOLUTION)
    if attrs.texture == "textured":
        fill = fill * (1.0 - TEXTURE_DARKEN * checker())
    img = bg * (1 - cov) + fill * cov
    if attrs.lighting == "dark":
        img = img * DARK_FACTOR
    return img.clamp(0, 1)


def render_batch(examples: list[Example] | list[Attributes]) -> torch.Tensor:
    """Render a list of examples (or attributes) to (B, 3, H, W)."""
    attrs = [e.attrs if isinstance(e, Example) else e for e in examples]
    return torch.stack([render(a) for a in attrs])


def with_style(attrs: Attributes, **changes: str) -> Attributes:
    return replace(attrs, **changes)

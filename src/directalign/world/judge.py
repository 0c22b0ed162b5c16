"""Analytic judges of the tiny world: independent of every learned model.

Each judge reads one attribute off an image with a closed-form rule:

* background colour and lighting: median of the border frame, nearest palette entry among the bright palette and
  the dark palette (palette x DARK_FACTOR);
* foreground mask: pixels farther than :data:`MASK_THRESHOLD` (RGB Euclidean) from the background estimate;
* foreground colour: median of the brighter half of the mask pixels (a textured fill darkens only half its cells),
  nearest palette entry;
* shape: best intersection-over-union of the mask against every ground-truth placement of every shape;
* texture: high-frequency energy of luminance inside the eroded mask, relative to the mask's mean luminance.

Images are float tensors (B, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import dataset as ds

MASK_THRESHOLD = 0.2
# the mask catches anti-aliased edge pixels of partial coverage, so templates are binarised below one half
TEMPLATE_COVERAGE = 0.4
# Relative high-frequency energy separating flat from textured fills; set between the two classes' ground-truth
# values (flat ~0, textured ~0.3; see tests/test_world_judge.py which checks accuracy on ground-truth renders).
TEXTURE_THRESHOLD = 0.08
_LUMA = torch.tensor([0.299, 0.587, 0.114])


@dataclass
class Judgement:
    fg: list[str]
    bg: list[str]
    shape: list[str]
    texture: list[str]
    lighting: list[str]

    def __getitem__(self, key: str) -> list[str]:
        return getattr(self, key)


def _palette_candidates() -> tuple[torch.Tensor, list[str], list[str]]:
    names = list(ds.PALETTE)
    bright = torch.tensor([ds.PALETTE[n] for n in names])
    cands = torch.cat([bright, bright * ds.DARK_FACTOR])
    return cands, names + names, ["bright"] * len(names) + ["dark"] * len(names)


@lru_cache(maxsize=1)
def _template_bank() -> tuple[torch.Tensor, list[str]]:
    """Binary masks (T, H*W) of every placement of every shape, with each template's shape name."""
    masks, labels = [], []
    r = range(-ds.MAX_OFFSET, ds.MAX_OFFSET + 1)
    for shape in ds.SHAPES:
        for size in ds.SIZES:
            for dx in r:
                for dy in r:
                    masks.append((ds.shape_coverage(shape, size, dx, dy) > TEMPLATE_COVERAGE).flatten())
                    labels.append(shape)
    return torch.stack(masks).float(), labels


def _nearest(colors: torch.Tensor) -> tuple[list[str], list[str]]:
    cands, names, lights = _palette_candidates()
    idx = torch.cdist(colors.float(), cands).argmin(dim=1)
    return [names[i] for i in idx.tolist()], [lights[i] for i in idx.tolist()]


def foreground_mask(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) boolean mask of foreground pixels and the (B, 3) background colour estimate."""
    b, _, h, w = images.shape
    frame = torch.ones(h, w, dtype=torch.bool)
    frame[2:-2, 2:-2] = False
    bg_est = images[:, :, frame].median(dim=2).values  # (B, 3)
    dist = (images - bg_est[:, :, None, None]).norm(dim=1)
    return dist > MASK_THRESHOLD, bg_est


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of a (B, H, W) mask by a (2r+1) square; where nothing would survive, the mask is kept."""
    k = 2 * radius + 1
    eroded = -F.max_pool2d(-mask[:, None].float(), k, stride=1, padding=radius)[:, 0] > 0.5
    empty = ~eroded.flatten(1).any(1)
    return torch.where(empty[:, None, None], mask, eroded)


def texture_energy(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |L - box3(L)| over the mask eroded by 2 px (edges excluded) divided by its mean luminance L; (B,).

    0 where the mask is empty.
    """
    luma = (images * _LUMA.to(images)[None, :, None, None]).sum(1, keepdim=True)
    high = (luma - F.avg_pool2d(luma, 3, stride=1, padding=1, count_include_pad=False)).abs()[:, 0]
    eroded = erode(mask, 2)
    count = eroded.flatten(1).sum(1).clamp(min=1)
    hf = (high * eroded).flatten(1).sum(1) / count
    mean_luma = (luma[:, 0] * eroded).flatten(1).sum(1) / count
    return torch.where(eroded.flatten(1).any(1), hf / (mean_luma + 0.05), torch.zeros_like(hf))


def judge(images: torch.Tensor) -> Judgement:
    """Read every attribute off every image."""
    images = images.detach().float().cpu().clamp(0, 1)
    mask, bg_est = foreground_mask(images)
    bg, lighting = _nearest(bg_est)

    fg_colors = []
    for img, m in zip(images, erode(mask, 1)):  # erosion drops anti-aliased edge pixels
        pix = img[:, m].T  # (N, 3)
        if len(pix) == 0:
            fg_colors.append(torch.zeros(3))
            continue
        luma = pix @ _LUMA
        bright_half = pix[luma >= luma.quantile(0.75)]
        fg_colors.append(bright_half.median(dim=0).values)
    fg, _ = _nearest(torch.stack(fg_colors))

    bank, labels = _template_bank()
    flat = mask.flatten(1).float()
    inter = flat @ bank.T
    union = flat.sum(1, keepdim=True) + bank.sum(1)[None] - inter
    best = (inter / union.clamp(min=1)).argmax(1)
    shape = [labels[i] for i in best.tolist()]

    energy = texture_energy(images, mask)
    texture = ["textured" if e > TEXTURE_THRESHOLD else "flat" for e in energy.tolist()]
    return Judgement(fg=fg, bg=bg, shape=shape, texture=texture, lighting=lighting)


def attribute_rates(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Fraction of images whose judged attribute equals the one the prompt names, per attribute.

    Attributes a prompt does not name are not scored; an attribute no prompt names is absent from the result.
    Also returns ``textured_share`` and ``dark_share``: the share of all images judged textured / dark, which is how
    SRPO's shift of an unnamed style is measured.
    """
    j = judge(images)
    hits: dict[str, list[bool]] = {}
    for i, prompt in enumerate(prompts):
        for key, value in ds.parse_caption(prompt).items():
            hits.setdefault(key, []).append(j[key][i] == value)
    rates = {k: sum(v) / len(v) for k, v in hits.items()}
    rates["textured_share"] = sum(t == "textured" for t in j.texture) / len(j.texture)
    rates["dark_share"] = sum(t == "dark" for t in j.lighting) / len(j.lighting)
    return rates

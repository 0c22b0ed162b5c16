"""Reward-hacking indicators: closed-form statistics of images, independent of every learned model.

All functions take float images (N, 3, H, W) with values in [0, 1] (RGB) and return one value per image (N,),
except :func:`diversity`, which returns one number for a set of samples grouped by prompt.

* :func:`saturation` -- mean HSV saturation ``S = (max - min) / max`` per pixel (0 where ``max = 0``). A grey image
  has 0, a pure primary or secondary colour has 1.
* :func:`brightness` -- mean luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (Rec. 601, the weights the tiny world's judge
  uses).
* :func:`colourfulness` -- Hasler and Suesstrunk (2003): with ``rg = R - G`` and ``yb = (R + G) / 2 - B`` per pixel,
  ``M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)`` (population standard deviations). Values
  here are on the [0, 1] pixel scale: multiply by 255 to compare with the paper's 8-bit numbers. A grey image has 0.
* :func:`high_frequency_energy` -- mean squared 4-neighbour Laplacian of luma over interior pixels (no padding),
  divided by 16. ``|L(x)| = |4 Y(x) - sum of the 4 neighbours| <= 4`` for luma in [0, 1], so the value lies in
  [0, 1], and a 1-pixel black/white checkerboard (every neighbour is the opposite colour, ``L = +-4``) scores
  exactly 1. A checkerboard of contrast ``a`` scores ``a^2``; 1-pixel stripes (two opposite and two equal
  neighbours, ``L = +-2 a``) score ``a^2 / 4``; constant images and linear ramps score 0.
* :func:`diversity` -- mean over prompts of the mean pairwise distance between the samples (seeds) of that prompt:
  the root-mean-square pixel difference (in [0, 1]) by default, or the cosine distance ``1 - cos`` between given
  embeddings (a reward's image embeddings, for instance). Identical samples score 0; a drop after training is the
  mode-collapse signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)
HF_NORMALISER = 16.0  # the largest possible squared Laplacian of luma in [0, 1]

# The indicators reported per image, in display order, with a one-line meaning.
INDICATORS = {
    "saturation": "mean HSV saturation (0 grey .. 1 pure colour)",
    "brightness": "mean Rec. 601 luma (0 black .. 1 white)",
    "colourfulness": "Hasler-Suesstrunk colourfulness on the [0, 1] scale (x255 for the paper's scale)",
    "hf_energy": "mean squared Laplacian of luma / 16 (1 = 1-px checkerboard)",
}


def _check(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    return images.detach().float().cpu()


def luma(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, H, W) Rec. 601 luma."""
    images = _check(images)
    w = torch.tensor(LUMA)[None, :, None, None]
    return (images * w).sum(1)


def saturation(images: torch.Tensor) -> torch.Tensor:
    images = _check(images)
    mx = images.max(dim=1).values
    mn = images.min(dim=1).values
    s = torch.where(mx > 0, (mx - mn) / mx.clamp(min=1e-12), torch.zeros_like(mx))
    return s.flatten(1).mean(1)


def brightness(images: torch.Tensor) -> torch.Tensor:
    return luma(images).flatten(1).mean(1)


def colourfulness(images: torch.Tensor) -> torch.Tensor:
    images = _check(images)
    r, g, b = images[:, 0].flatten(1), images[:, 1].flatten(1), images[:, 2].flatten(1)
    rg = r - g
    yb = 0.5 * (r + g) - b
    sigma = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()
    mu = (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()
    return sigma + 0.3 * mu


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    y = luma(images)[:, None]
    if y.shape[-1] < 3 or y.shape[-2] < 3:
        raise ValueError("high_frequency_energy needs images of at least 3x3 pixels")
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    lap = F.conv2d(y, kernel)  # valid convolution: interior pixels only
    return (lap**2).flatten(1).mean(1) / HF_NORMALISER


def image_indicators(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every per-image indicator of :data:`INDICATORS`, each (N,)."""
    return {
        "saturation": saturation(images),
        "brightness": brightness(images),
        "colourfulness": colourfulness(images),
        "hf_energy": high_frequency_energy(images),
    }


def _pairwise(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean distance over the unordered pairs of rows of x (K, D), K >= 2."""
    if kind == "pixel":
        d = torch.cdist(x[None].double(), x[None].double())[0] / (x.shape[1] ** 0.5)  # RMS difference
    else:
        u = F.normalize(x.double(), dim=-1)
        d = (1 - u @ u.T).clamp(min=0)
    k = x.shape[0]
    iu = torch.triu_indices(k, k, offset=1)
    return d[iu[0], iu[1]].mean()


def diversity_per_prompt(images: torch.Tensor | None, groups: list, embeddings: torch.Tensor | None = None
                         ) -> dict:
    """``{group: mean pairwise distance}`` for every group with at least two samples.

    ``groups[i]`` names the group (prompt) of sample i. Pixel RMS distance of ``images``, or cosine distance of
    ``embeddings`` (N, D) when those are given.
    """
    if embeddings is not None:
        feats, kind = embeddings.detach().float().cpu().flatten(1), "embedding"
    else:
        feats, kind = _check(images).flatten(1), "pixel"
    if len(groups) != feats.shape[0]:
        raise ValueError(f"{len(groups)} group labels for {feats.shape[0]} samples")
    index: dict = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    return {g: float(_pairwise(feats[idx], kind)) for g, idx in index.items() if len(idx) >= 2}


def diversity(images: torch.Tensor | None, groups: list, embeddings: torch.Tensor | None = None) -> float:
    """Mean over groups of :func:`diversity_per_prompt`; NaN when no group has two samples (one seed only)."""
    per = diversity_per_prompt(images, groups, embeddings)
    return sum(per.values()) / len(per) if per else float("nan")


def frame_difference(videos: torch.Tensor) -> torch.Tensor:
    """The frame-consistency indicator of videos (N, F, 3, H, W) in [0, 1]: per video, the mean absolute pixel
    difference between consecutive frames, ``mean_{f, c, y, x} |v[f + 1] - v[f]|`` over the F - 1 pairs, in [0, 1]
    (0: a still video; 1: frames alternating black and white). A rise is flicker, a fall a video freezing; one-frame
    videos score 0. (N,)"""
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"expected videos of shape (N, F, 3, H, W), got {tuple(videos.shape)}")
    v = videos.detach().float().cpu()
    if v.shape[1] < 2:
        return torch.zeros(v.shape[0])
    return (v[:, 1:] - v[:, :-1]).abs().flatten(1).mean(1)


# Drift thresholds of the hacking indicators between a reference (the base model) and a tuned model. A change past
# a threshold is reported as a plain warning in `directalign eval --baseline`, `compare` and the run report.
#   ("abs", t): |after - before| > t          (quantities on a fixed [0, 1] scale)
#   ("rel", t): |after - before| / max(|before|, 1e-3) > t
#   ("drop", t): (before - after) / max(|before|, 1e-3) > t   (only a decrease is a warning)
DRIFT_THRESHOLDS = {
    "saturation": ("abs", 0.10),  # oversaturated colours are the classic reward hack
    "brightness": ("abs", 0.10),  # over-bright or over-dark images (e.g. SRPO's "dark" drift)
    "colourfulness": ("rel", 0.25),
    "hf_energy": ("rel", 0.50),  # over-sharpened, noisy or over-textured images
    "diversity_pixel": ("drop", 0.30),  # samples of one prompt collapse onto one image
    "frame_difference": ("rel", 0.50),  # videos: flicker (rise) or frozen motion (fall), see frame_difference
}


def drift_warnings(before: dict, after: dict, thresholds: dict | None = None) -> list[str]:
    """Plain-language warnings for every indicator whose change from ``before`` to ``after`` passes its threshold.

    ``before`` and ``after`` map indicator names (keys of :data:`DRIFT_THRESHOLDS`) to means; missing or
    non-finite values are skipped.
    """
    import math

    out = []
    for key, (kind, t) in (thresholds or DRIFT_THRESHOLDS).items():
        a, b = after.get(key), before.get(key)
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            continue
        change = a - b
        rel = change / max(abs(b), 1e-3)
        if kind == "abs" and abs(change) > t:
            out.append(f"{key} moved by {change:+.3f} ({b:.3f} -> {a:.3f}), more than the {t:.2f} threshold")
        elif kind == "rel" and abs(rel) > t:
            out.append(f"{key} changed by {rel:+.0%} ({b:.4f} -> {a:.4f}), more than the {t:.0%} threshold")
        elif kind == "drop" and -rel > t:
            out.append(f"{key} fell by {-rel:.0%} ({b:.4f} -> {a:.4f}), more than the {t:.0%} threshold: samples "
                       "of one prompt are becoming alike (mode collapse)")
    return out

"""Differentiable image preprocessing that mirrors each reward model's published pipeline.

Every CLIP-family reward in the zoo was published with the same three steps on a PIL image:

1. resize the shortest side to ``size`` with bicubic filtering; the long side becomes ``int(size * long / short)``
   (truncated, as both ``torchvision.transforms.Resize`` and transformers' ``CLIPImageProcessor`` compute it);
2. centre crop ``size x size``; the offset is ``(H - size) // 2`` in transformers' processor (PickScore, CLIP
   models used through transformers) and ``int(round((H - size) / 2))`` in torchvision's ``CenterCrop`` (open_clip /
   HPSv2, OpenAI CLIP's ``preprocess`` used by the LAION aesthetic predictor, ImageReward). They differ by one pixel
   only when the overhang is odd, never for square images;
3. scale to [0, 1] and normalise with the model's mean and std (OpenAI CLIP's for every model here).

HPSv2's published ``preprocess_val`` (open_clip ``image_transform(..., resize_longest_max=True)``) differs: it resizes
the *longest* side to ``size`` (``round(dim * size / longest)``) and pads the short side with black to a square
(``ResizeMaxSize``), see :func:`resize_longest_pad`. For square images both pipelines are a plain resize.

Here the resize is ``F.interpolate(mode="bicubic", antialias=True)``, which uses PIL's bicubic kernel (a = -0.5)
with PIL's support widening when downsampling, clamped to [0, 1] as PIL clips the kernel's overshoot to 8 bits, so
it follows PIL up to PIL's 8-bit rounding: within 1.5/255 per pixel, 0.25/255 on average, on real images
(``tests/test_reward_zoo.py``; measured 1.1/255 and 0.1/255). The official SRPO training code applies torchvision's
``Resize(224, bicubic) + CenterCrop(224) + Normalize`` to the decoded float tensor, i.e. the same without the clamp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation: CLIP, PickScore, HPSv2, the LAION aesthetic predictor and ImageReward all use it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_MODES = ("floor", "round", "pad")


def _bicubic(images: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL-style bicubic resize of images in [0, 1]; PIL clips the kernel's overshoot to the pixel range."""
    out = F.interpolate(images, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0, 1)


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shortest side to ``size`` (long side truncated, as torchvision / transformers)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def crop_offset(length: int, size: int, mode: str) -> int:
    if mode == "floor":
        return (length - size) // 2
    if mode == "round":
        return int(round((length - size) / 2.0))
    raise ValueError(f"crop mode {mode!r}; choose from {CROP_MODES}")


def resize_center_crop(images: torch.Tensor, size: int, crop: str = "floor") -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size): shortest side to ``size`` (bicubic, antialiased), centre crop."""
    h, w = images.shape[-2:]
    nh, nw = resized_size(h, w, size)
    if (nh, nw) != (h, w):
        images = _bicubic(images, nh, nw)
    top, left = crop_offset(nh, size, crop), crop_offset(nw, size, crop)
    return images[..., top : top + size, left : left + size]


def resize_longest_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip's ``ResizeMaxSize(size, fill=0)``: longest side to ``size`` (bicubic), black padding split
    ``pad // 2`` before and the rest after. (open_clip skips the pad when the longest side already equals ``size``;
    a non-square model input is never valid, so this pads in that case too.)"""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        images = _bicubic(images, nh, nw)
    ph, pw = size - nh, size - nw
    if ph or pw:
        images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    return images


def normalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device, dtype=images.dtype)[None, :, None, None]
    s = torch.tensor(std, device=images.device, dtype=images.dtype)[None, :, None, None]
    return (images - m) / s


def published_preprocess(images: torch.Tensor, size: int, crop: str = "floor", mean=CLIP_MEAN,
                         std=CLIP_STD) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> the model's normalised input (B, 3, size, size), differentiable.

    ``crop``: ``"floor"`` / ``"round"`` (shortest side + centre crop with that offset rule) or ``"pad"`` (longest side
    + black padding, HPSv2's published transform)."""
    if crop == "pad":
        return normalize(resize_longest_pad(images, size), mean, std)
    return normalize(resize_center_crop(images, size, crop), mean, std)

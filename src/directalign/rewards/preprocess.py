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
(``ResizeMaxSize``), see :func:`resize_longest_pad`. For square images both pipelines are a plain resize. HPSv2 runs
``ResizeMaxSize`` after ``ToTensor``, on the float tensor (torchvision's antialiased bicubic, no 8-bit rounding, no
clipping), so that path is not clamped and equals HPSv2's to float precision
(``tests/test_hps_openclip_reference.py``, against torchvision).

SigLIP models (the Aesthetic Predictor v2.5 backbone, ``google/siglip-so400m-patch14-384``) are published with
transformers' ``SiglipImageProcessor``: both sides resized to ``size`` (bicubic, aspect ratio not kept, no crop),
scaled to [0, 1] and normalised with mean = std = 0.5, i.e. to [-1, 1]; see :func:`resize_square` (``crop="squash"``).

Here the resize is ``F.interpolate(mode="bicubic", antialias=True)``, which uses PIL's bicubic kernel (a = -0.5)
with PIL's support widening when downsampling, clamped to [0, 1] as PIL clips the kernel's overshoot to 8 bits, so
it follows PIL up to PIL's 8-bit rounding: within 1.5/255 per pixel, 0.25/255 on average, on real images
(``tests/test_reward_zoo.py``; measured 1.1/255 and 0.1/255). PIL rounds and clips after each of its two separable
passes, so at hard black / white edges a few pixels differ more (up to 24/255 on the synthetic images of
``tests/data/hps_openclip_reference``, 0.4/255 on average). The official SRPO training code (Tencent-Hunyuan/SRPO,
``fastvideo/SRPO.py``) applies torchvision's ``Resize(224, bicubic) + CenterCrop(224) + Normalize`` to the decoded
float tensor, i.e. the same without the clamp: ``clamp=False`` (``reward.clamp_resized=false``) follows it; it
changes 0.2-0.7 % of the resized pixels of typical images and the reward's gradient by 1-2.6 % (relative). The
``"pad"`` path never clamps (HPSv2's published transform resizes the float tensor too), whatever ``clamp`` says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# OpenAI CLIP's normalisation: CLIP, PickScore, HPSv2, the LAION aesthetic predictor and ImageReward all use it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP's normalisation (transformers' SiglipImageProcessor, the SigLIP checkpoints' preprocessor_config.json).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CROP_MODES = ("floor", "round", "pad", "squash")


def _bicubic(images: torch.Tensor, h: int, w: int, clamp: bool = True) -> torch.Tensor:
    """PIL-style bicubic resize of images in [0, 1]; PIL clips the kernel's overshoot to the pixel range
    (``clamp=True``); ``clamp=False`` keeps it, as torchvision's ``Resize`` of a float tensor does."""
    out = F.interpolate(images, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0, 1) if clamp else out


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


def resize_center_crop(images: torch.Tensor, size: int, crop: str = "floor", clamp: bool = True) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size): shortest side to ``size`` (bicubic, antialiased; clamped to [0, 1] unless
    ``clamp=False``), centre crop."""
    h, w = images.shape[-2:]
    nh, nw = resized_size(h, w, size)
    if (nh, nw) != (h, w):
        images = _bicubic(images, nh, nw, clamp)
    top, left = crop_offset(nh, size, crop), crop_offset(nw, size, crop)
    return images[..., top : top + size, left : left + size]


def resize_longest_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip's ``ResizeMaxSize(size, fill=0)``: longest side to ``size`` (bicubic), black padding split
    ``pad // 2`` before and the rest after. (open_clip skips the pad when the longest side already equals ``size``;
    a non-square model input is never valid, so this pads in that case too.) HPSv2 applies it to the float tensor
    after ``ToTensor`` (torchvision's antialiased bicubic), so the kernel's overshoot is kept, not clamped as PIL
    would."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    ph, pw = size - nh, size - nw
    if ph or pw:
        images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    return images


def resize_square(images: torch.Tensor, size: int, clamp: bool = True) -> torch.Tensor:
    """transformers' ``SiglipImageProcessor`` resize: (B, 3, H, W) -> (B, 3, size, size), each side scaled on its
    own (bicubic, antialiased, clamped unless ``clamp=False``; a non-square image is squashed, nothing is cropped or
    padded)."""
    if tuple(images.shape[-2:]) != (size, size):
        images = _bicubic(images, size, size, clamp)
    return images


def normalize(images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device, dtype=images.dtype)[None, :, None, None]
    s = torch.tensor(std, device=images.device, dtype=images.dtype)[None, :, None, None]
    return (images - m) / s


def published_preprocess(images: torch.Tensor, size: int, crop: str = "floor", mean=CLIP_MEAN,
                         std=CLIP_STD, clamp: bool = True) -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> the model's normalised input (B, 3, size, size), differentiable.

    ``crop``: ``"floor"`` / ``"round"`` (shortest side + centre crop with that offset rule), ``"pad"`` (longest side
    + black padding, HPSv2's published transform) or ``"squash"`` (both sides to ``size``, SigLIP's processor).
    ``clamp``: clip the resized image to [0, 1] as PIL does (the published pipelines); ``False`` keeps the bicubic
    overshoot, as the official SRPO code's resize of the float tensor. ``"pad"`` never clamps."""
    if crop == "pad":
        return normalize(resize_longest_pad(images, size), mean, std)
    if crop == "squash":
        return normalize(resize_square(images, size, clamp), mean, std)
    return normalize(resize_center_crop(images, size, crop, clamp), mean, std)
